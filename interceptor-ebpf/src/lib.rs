#![no_std]

// Lets the userspace crate name this crate as a build dependency (cargo needs a lib target).
