//! The node CA: it mints a short-lived client certificate per workload id (URI SAN = the
//! workload id) for upstream mTLS, and signs per-request identity assertions (compact JWS,
//! ES256) that upstreams verify with the key set `interceptor ca jwks` prints.
//!
//! Keys of minted certificates live in memory only. Minting happens outside any lock, so a slow
//! mint never blocks other connections; a certificate is reused until a third of its lifetime
//! is left.

use std::{
    collections::HashMap,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use p256::{ecdsa::SigningKey, pkcs8::DecodePrivateKey};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use tracing::warn;

use crate::bpf::lock;

/// Default `[ca] leaf_ttl`.
pub const DEFAULT_LEAF_TTL: &str = "1h";

/// `[ca]`: where the node CA is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCa {
    /// CA certificate (PEM): the node CA `interceptor ca init` made, or an intermediate CA
    /// issued by the organisation's PKI.
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, ECDSA P-256); must not be readable by group or others.
    pub key: PathBuf,
    /// Lifetime of minted client certificates, e.g. "1h", "10m", "2s".
    #[serde(default = "default_ttl")]
    pub leaf_ttl: String,
}

fn default_ttl() -> String {
    DEFAULT_LEAF_TTL.into()
}

/// CA errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// The key file is readable by others.
    #[error(
        "{path} is readable by group or others (mode {mode:o}); the node CA key must be private: chmod 600 {path}"
    )]
    KeyExposed { path: PathBuf, mode: u32 },
    /// The key file belongs to a user other than root and this process.
    #[error(
        "{path} is owned by uid {owner}: that user can read the node CA key (and replace it); \
         chown root {path}"
    )]
    KeyForeign { path: PathBuf, owner: u32 },
    /// The certificate or key is not usable.
    #[error("{0}")]
    Invalid(String),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::File {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// `interceptor ca init --dir D`: a new node CA in `D/ca.pem` and `D/ca-key.pem` (ECDSA P-256,
/// key mode 0600). Existing files are never overwritten.
pub fn init(dir: &Path, node: &str) -> Result<(PathBuf, PathBuf), Error> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::File {
            path: dir.to_owned(),
            message: "is not a directory; --dir names the folder to write ca.pem and \
                      ca-key.pem into"
                .into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(file_err(dir))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(Error::File {
                path: p.clone(),
                message: "already exists; remove it first if you really want a new CA".into(),
            });
        }
    }
    let key = KeyPair::generate().map_err(|e| Error::Invalid(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("interceptor node CA {node}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(365);
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    // Created, never opened through a link planted meanwhile (existing files are never
    // overwritten); the key readable by its owner only.
    let create = |path: &Path, mode: u32, text: &str| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(file_err(path))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(file_err(path))
    };
    create(&key_path, 0o600, &key.serialize_pem())?;
    create(&cert_path, 0o644, &cert.pem())?;
    Ok((cert_path, key_path))
}

/// Most workloads whose certificates (and upstream pools) are kept: beyond, the oldest go
/// (and are minted again if they come back). A workload id template with agent-settable parts
/// (`{comm}`, `{exe}`, `{gid}`) would otherwise let an agent grow these without bound.
#[cfg(not(test))]
pub const MAX_WORKLOADS: usize = 16_384;
#[cfg(test)]
pub const MAX_WORKLOADS: usize = 4;

/// How often at most the entries whose certificate expired are looked for (also whenever the
/// map is full).
#[cfg(not(test))]
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
#[cfg(test)]
const SWEEP_INTERVAL: Duration = Duration::ZERO;

/// What is kept per workload id (its certificate; the upstream pools built on it), at most
/// [`MAX_WORKLOADS`] entries. Inserting costs O(1) amortised: entries whose certificate expired
/// are dropped at most every [`SWEEP_INTERVAL`] or when the map is full, and a full map drops
/// its oldest sixteenth at once (a walk over every entry on each mint, under the lock every
/// new connection takes, made a workload id template with agent-settable parts a way to slow
/// every agent's new connections).
pub struct ByWorkload<V> {
    map: HashMap<String, V>,
    cap: usize,
    sweep_every: Duration,
    swept: SystemTime,
}

impl<V> Default for ByWorkload<V> {
    fn default() -> Self {
        Self::with_limits(MAX_WORKLOADS, SWEEP_INTERVAL)
    }
}

impl<V> ByWorkload<V> {
    fn with_limits(cap: usize, sweep_every: Duration) -> Self {
        Self {
            map: HashMap::new(),
            cap: cap.max(1),
            sweep_every,
            swept: SystemTime::UNIX_EPOCH,
        }
    }

    pub fn get(&self, workload_id: &str) -> Option<&V> {
        self.map.get(workload_id)
    }

    /// The workload ids held.
    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// Keeps `value` for `workload_id` (replacing what it had), making room first; `leaf` is
    /// the certificate an entry was built on.
    pub fn insert(
        &mut self,
        workload_id: String,
        value: V,
        now: SystemTime,
        leaf: impl Fn(&V) -> &Leaf,
    ) {
        let full =
            |map: &HashMap<String, V>| map.len() >= self.cap && !map.contains_key(&workload_id);
        // A clock stepped back (now before the last sweep) counts as due.
        let due = !now
            .duration_since(self.swept)
            .is_ok_and(|d| d < self.sweep_every);
        if due || full(&self.map) {
            self.map.retain(|_, v| !leaf(v).expired(now));
            self.swept = now;
        }
        if full(&self.map) {
            let n = (self.cap / 16).max(1);
            let mut by_age: Vec<(SystemTime, &String)> =
                self.map.iter().map(|(k, v)| (leaf(v).minted, k)).collect();
            by_age.select_nth_unstable(n - 1);
            let oldest: Vec<String> = by_age[..n].iter().map(|(_, k)| (*k).clone()).collect();
            for k in oldest {
                self.map.remove(&k);
            }
        }
        self.map.insert(workload_id, value);
    }
}

/// The PEM text of a P-256 private key as PKCS#8: PKCS#8 (`PRIVATE KEY`) as is, SEC1
/// (`EC PRIVATE KEY`, what `openssl ecparam -genkey` writes) converted.
fn pkcs8_pem(text: &str) -> Result<String, String> {
    if !text.contains("-----BEGIN EC PRIVATE KEY-----") {
        return Ok(text.to_owned());
    }
    use p256::pkcs8::EncodePrivateKey as _;
    // openssl writes an `EC PARAMETERS` block first.
    let blocks = pem::parse_many(text).map_err(|e| e.to_string())?;
    let sec1 = blocks
        .iter()
        .find(|b| b.tag() == "EC PRIVATE KEY")
        .ok_or("no EC PRIVATE KEY block")?;
    let key = p256::SecretKey::from_sec1_der(sec1.contents()).map_err(|e| e.to_string())?;
    key.to_pkcs8_pem(Default::default())
        .map(|pem| pem.to_string())
        .map_err(|e| e.to_string())
}

/// `t` rounded up to a whole second.
fn whole_seconds(t: SystemTime) -> SystemTime {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    UNIX_EPOCH + Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// Sleeps until `t` (at once if it passed): tests of expiry, which is whole seconds.
#[cfg(test)]
pub(crate) fn sleep_until(t: SystemTime) {
    if let Ok(d) = t.duration_since(SystemTime::now()) {
        std::thread::sleep(d);
    }
}

/// How far before its minting a certificate is valid (clock skew between node and upstream).
const BACKDATE: Duration = Duration::from_secs(30);

/// A minted client certificate.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    pub not_after: SystemTime,
    minted: SystemTime,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Past its `not_after`: of no use to anyone any more.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.not_after <= now
    }

    /// Still usable without renewal: valid already (a clock stepped back past its
    /// `not_before` leaves it in the upstream's future) and more than a third of its lifetime
    /// left.
    fn fresh(&self, now: SystemTime) -> bool {
        let life = self
            .not_after
            .duration_since(self.minted)
            .unwrap_or_default();
        now + BACKDATE >= self.minted
            && self
                .not_after
                .duration_since(now)
                .is_ok_and(|left| left > life / 3)
    }
}

/// The loaded node CA.
pub struct NodeCa {
    /// A digest of the certificate and key files as loaded (a reload tells a change).
    files_digest: [u8; 32],
    issuer: Issuer<'static, KeyPair>,
    /// The CA's subject as encoded in its certificate.
    subject: Vec<u8>,
    /// The CA certificate's `notAfter`.
    not_after: SystemTime,
    ca_der: CertificateDer<'static>,
    /// Certificates after the CA's in its file (the issuers above it), sent with each leaf.
    above: Vec<CertificateDer<'static>>,
    /// The CA key as p256 knows it (for the JWKS).
    signer: SigningKey,
    /// The identity assertions' signer (`typ` `JWT`).
    assertions: JwsSigner,
    /// The audit checkpoints' signer (the same key, `typ` [`CHECKPOINT_TYP`]).
    checkpoints: Arc<JwsSigner>,
    leaf_ttl: Duration,
    cache: Mutex<ByWorkload<Arc<Leaf>>>,
    /// Certificates minted so far.
    pub mints: AtomicU64,
}

/// Parses "1h", "90s", "10m" (humantime).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. \"1h\", \"10m\", \"30s\"")
    })?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than one second"));
    }
    Ok(d)
}

impl NodeCa {
    /// Loads the CA; refuses a key readable by group or others.
    pub fn load(cfg: &RawCa) -> Result<Self, Error> {
        let key_text = read_private(&cfg.key)?;
        let cert_pem = std::fs::read_to_string(&cfg.cert).map_err(file_err(&cfg.cert))?;
        let invalid = |what: &str, e: String| Error::Invalid(format!("{what}: {e}"));
        let key_pem = pkcs8_pem(&key_text).map_err(|e| {
            invalid(
                &format!(
                    "CA key {} (must be ECDSA P-256, PKCS#8 or SEC1 PEM)",
                    cfg.key.display()
                ),
                e,
            )
        })?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(&format!("CA key {}", cfg.key.display()), e.to_string()))?;
        let signer = SigningKey::from_pkcs8_pem(&key_pem).map_err(|e| {
            invalid(
                &format!("CA key {} (must be ECDSA P-256, PKCS#8)", cfg.key.display()),
                e.to_string(),
            )
        })?;
        // The CA first, then any certificates above it (an organisation's intermediate and its
        // issuers), sent after each leaf so upstreams that trust only the root can build the path.
        let mut chain = pem::parse_many(&cert_pem)
            .map_err(|e| {
                invalid(
                    &format!("CA certificate {}", cfg.cert.display()),
                    e.to_string(),
                )
            })?
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents);
        let ca_der = chain.next().ok_or_else(|| {
            invalid(
                &format!("CA certificate {}", cfg.cert.display()),
                "no CERTIFICATE block in it".to_owned(),
            )
        })?;
        let above: Vec<CertificateDer<'static>> = chain.map(CertificateDer::from).collect();
        // A key that is not the certificate's would mint leaves no upstream accepts.
        let (_, cert) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| {
            invalid(
                &format!("CA certificate {}", cfg.cert.display()),
                e.to_string(),
            )
        })?;
        if cert.public_key().subject_public_key.data.as_ref()
            != signer.verifying_key().to_encoded_point(false).as_bytes()
        {
            return Err(invalid(
                &format!("CA key {}", cfg.key.display()),
                format!(
                    "it is not the key of the CA certificate {} (the first certificate in \
                     that file: the CA comes first, then the ones above it); point [ca] key at \
                     that certificate's private key",
                    cfg.cert.display()
                ),
            ));
        }
        let mut not_after = usable_as_ca(&cert, SystemTime::now())
            .map_err(|e| invalid(&format!("CA certificate {}", cfg.cert.display()), e))?;
        // The certificates above it end the chain's validity too: a leaf outliving one is
        // refused by every upstream that builds its path through it.
        for (i, der) in above.iter().enumerate() {
            let what = format!(
                "certificate {} above the CA in {}",
                i + 1,
                cfg.cert.display()
            );
            let (_, above_cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| invalid(&what, e.to_string()))?;
            let end = valid_at(&above_cert, SystemTime::now())
                .map_err(|e| invalid(&what, format!("{e} (upstreams would refuse every leaf)")))?;
            not_after = not_after.min(end);
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca_der.as_slice()), key)
            .map_err(|e| {
                invalid(
                    &format!("CA certificate {}", cfg.cert.display()),
                    e.to_string(),
                )
            })?;
        let leaf_ttl = parse_ttl(&cfg.leaf_ttl).map_err(Error::Invalid)?;
        let jws = |typ| {
            JwsSigner::new(&signer, typ)
                .map_err(|e| invalid(&format!("CA key {}", cfg.key.display()), e))
        };
        let (assertions, checkpoints) = (jws(ASSERTION_TYP)?, Arc::new(jws(CHECKPOINT_TYP)?));
        let ca = Self {
            files_digest: files_digest(&cert_pem, &key_text),
            issuer,
            subject: cert.subject().as_raw().to_vec(),
            not_after,
            above,
            ca_der: CertificateDer::from(ca_der.clone()),
            signer,
            assertions,
            checkpoints,
            leaf_ttl,
            cache: Mutex::default(),
            mints: AtomicU64::new(0),
        };
        // A leaf whose issuer is not written as the CA's subject chains to nothing (rcgen
        // keeps one value per attribute type: `DC=corp, DC=example` loses one): found here,
        // not by every upstream refusing every workload.
        let probe = ca.mint("spiffe://interceptor.invalid/probe", SystemTime::now())?;
        let issued_as = x509_parser::parse_x509_certificate(&probe.chain[0])
            .map(|(_, leaf)| leaf.issuer().as_raw().to_vec())
            .unwrap_or_default();
        if issued_as != ca.subject {
            return Err(invalid(
                &format!("CA certificate {}", cfg.cert.display()),
                format!(
                    "its subject {:?} cannot be reproduced in the certificates it would issue \
                     (a repeated attribute type?); use a CA with a simpler subject",
                    cert.subject().to_string()
                ),
            ));
        }
        ca.mints.store(0, Ordering::Relaxed);
        if let Ok(left) = not_after.duration_since(SystemTime::now())
            && left < CA_EXPIRY_WARNING
        {
            warn!(
                cert = %cfg.cert.display(),
                days_left = left.as_secs() / 86_400,
                "the node CA (or a certificate above it in its file) expires soon; every certificate it issues ends with it: renew it"
            );
        }
        Ok(ca)
    }

    /// When the CA certificate, or one above it, expires (no leaf outlives it).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The key id of the assertions' signing key (as in the JWKS).
    pub fn kid(&self) -> &str {
        &self.assertions.kid
    }

    /// How every assertion this CA signs starts (its encoded JWS header and the dot after
    /// it), as a searcher.
    pub fn token_prefix(&self) -> Arc<crate::mcp::Needle> {
        self.assertions.prefix_needle.clone()
    }

    /// A signer of audit checkpoints with this CA's key (`typ`
    /// [`CHECKPOINT_TYP`]: never taken for an assertion, nor an assertion for a checkpoint).
    pub fn checkpoint_signer(&self) -> Arc<JwsSigner> {
        self.checkpoints.clone()
    }

    /// Whether the files at `cfg`'s paths now hold something else than what was loaded (a
    /// renewed or replaced CA, which takes a restart), or cannot be read.
    pub fn files_changed(&self, cfg: &RawCa) -> bool {
        match (std::fs::read_to_string(&cfg.cert), read_private(&cfg.key)) {
            (Ok(cert), Ok(key)) => files_digest(&cert, &key) != self.files_digest,
            _ => true,
        }
    }

    /// The client certificate for `workload_id`, minted on first use and renewed before expiry.
    pub fn leaf(&self, workload_id: &str) -> Result<Arc<Leaf>, Error> {
        let now = SystemTime::now();
        if let Some(l) = lock(&self.cache).get(workload_id)
            && l.fresh(now)
        {
            return Ok(l.clone());
        }
        let leaf = Arc::new(self.mint(workload_id, now)?);
        // Workloads come and go (a cgroup per pod or job): certificates that expired go, so
        // the cache holds the workloads seen within one lifetime.
        lock(&self.cache).insert(workload_id.to_owned(), leaf.clone(), now, |l| l);
        Ok(leaf)
    }

    fn mint(&self, workload_id: &str, now: SystemTime) -> Result<Leaf, Error> {
        let invalid = |e: rcgen::Error| Error::Invalid(format!("minting for {workload_id}: {e}"));
        if now >= self.not_after {
            return Err(Error::Invalid(format!(
                "minting for {workload_id}: the node CA expired at {}; renew it and restart \
                 the daemon",
                humantime::format_rfc3339_seconds(self.not_after)
            )));
        }
        let key = KeyPair::generate().map_err(invalid)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "interceptor workload");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            workload_id
                .try_into()
                .map_err(|e: rcgen::Error| invalid(e))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let start = time::OffsetDateTime::from(now);
        // A little backdating absorbs clock skew between node and upstream.
        params.not_before = start - BACKDATE;
        // X.509 times are whole seconds (rcgen drops the fraction): renewal and expiry are
        // judged on the time the certificate states, never past it (rounded up, so a leaf
        // lives at least `leaf_ttl`).
        // Never past the CA's own end (no verifier would accept it then).
        let not_after = whole_seconds(now + self.leaf_ttl).min(self.not_after);
        params.not_after = time::OffsetDateTime::from(not_after);
        let cert = params.signed_by(&key, &self.issuer).map_err(invalid)?;
        self.mints.fetch_add(1, Ordering::Relaxed);
        let mut chain = Vec::with_capacity(2 + self.above.len());
        chain.push(cert.der().clone());
        chain.push(self.ca_der.clone());
        chain.extend(self.above.iter().cloned());
        Ok(Leaf {
            chain,
            key_der: key.serialize_der(),
            not_after,
            minted: now,
        })
    }

    /// An identity assertion: a compact JWS (ES256) over `claims`.
    pub fn sign(&self, claims: &impl serde::Serialize) -> String {
        self.assertions.sign(claims)
    }

    /// The JSON Web Key Set that verifies [`NodeCa::sign`] (and the audit checkpoints).
    pub fn jwks(&self) -> Value {
        let public = p256::PublicKey::from(self.signer.verifying_key());
        let mut jwk: Value = serde_json::from_str(&public.to_jwk_string()).unwrap_or(json!({}));
        jwk["kid"] = Value::from(self.kid());
        jwk["alg"] = Value::from("ES256");
        jwk["use"] = Value::from("sig");
        json!({"keys": [jwk]})
    }
}

/// The JWS `typ` of identity assertions.
const ASSERTION_TYP: &str = "JWT";

/// The JWS `typ` of audit checkpoints (`audit.checkpoint` events).
pub const CHECKPOINT_TYP: &str = "interceptor-audit-checkpoint+jwt";

/// Signs compact JWS (ES256) with one key and one protected header (`alg`, `typ`, `kid`).
pub struct JwsSigner {
    /// The key as ring knows it: signing with ring's P-256 is several times faster than
    /// p256's, and every forwarded request carries a fresh assertion.
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    /// The key id (as in the JWKS): the first 8 bytes of the SHA-256 of the public point, hex.
    kid: String,
    /// The protected header, base64url-encoded once, and the dot after it.
    prefix: Arc<str>,
    /// The same, as a searcher (assertions are scrubbed from answers by it).
    prefix_needle: Arc<crate::mcp::Needle>,
}

impl JwsSigner {
    fn new(signer: &SigningKey, typ: &str) -> Result<Self, String> {
        let public = signer.verifying_key().to_encoded_point(false);
        let rng = ring::rand::SystemRandom::new();
        // From the scalar and the point: PKCS#8 files without the optional public key work too.
        let key = ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &signer.to_bytes(),
            public.as_bytes(),
            &rng,
        )
        .map_err(|e| e.to_string())?;
        let kid = hex16(&Sha256::digest(public.as_bytes()));
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"alg": "ES256", "typ": typ, "kid": kid}).to_string());
        let prefix = format!("{header}.");
        Ok(Self {
            key,
            rng,
            kid,
            prefix_needle: Arc::new(memchr::memmem::Finder::new(prefix.as_bytes()).into_owned()),
            prefix: Arc::from(prefix),
        })
    }

    /// The key id the JWS header names.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A compact JWS over `claims`.
    pub fn sign(&self, claims: &impl serde::Serialize) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        // Serialising plain data to a Vec cannot fail; an empty payload would fail upstream.
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let mut jws = String::with_capacity(self.prefix.len() + payload.len() * 4 / 3 + 100);
        jws.push_str(&self.prefix);
        b64.encode_string(&payload, &mut jws);
        // ring fails only if the system RNG does; an empty signature then fails verification
        // (the request is refused upstream, the checkpoint by `audit verify`) rather than the
        // daemon panicking.
        let sig = self
            .key
            .sign(&self.rng, jws.as_bytes())
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default();
        jws.push('.');
        b64.encode_string(&sig, &mut jws);
        jws
    }
}

/// Public keys read from a JSON Web Key Set (`interceptor ca jwks`), by key id: what verifies
/// audit checkpoints.
#[derive(Debug)]
pub struct Jwks {
    keys: Vec<(String, p256::ecdsa::VerifyingKey)>,
}

impl Jwks {
    /// Reads a key set (`{"keys": [...]}`, or a single key): its P-256 keys that have a `kid`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let list = match v.get("keys") {
            Some(Value::Array(keys)) => keys.clone(),
            Some(_) => return Err("\"keys\" is not an array".into()),
            None => vec![v],
        };
        let mut keys = Vec::new();
        for (i, k) in list.iter().enumerate() {
            if k["kty"] != "EC" || k["crv"] != "P-256" {
                continue;
            }
            let Some(kid) = k["kid"].as_str() else {
                return Err(format!("key {i} has no \"kid\""));
            };
            let jwk = json!({"kty": "EC", "crv": "P-256", "x": k["x"], "y": k["y"]}).to_string();
            let public = p256::PublicKey::from_jwk_str(&jwk)
                .map_err(|e| format!("key {i} ({kid}) is not a P-256 public key: {e}"))?;
            keys.push((kid.to_owned(), p256::ecdsa::VerifyingKey::from(public)));
        }
        if keys.is_empty() {
            return Err("no P-256 key (kty EC, crv P-256) in it".into());
        }
        Ok(Self { keys })
    }

    /// The claims of compact JWS `token` if it is an ES256 signature of type `typ` by one of
    /// these keys; why not otherwise.
    pub fn verify(&self, token: &str, typ: &str) -> Result<Value, String> {
        use p256::ecdsa::signature::Verifier;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS (three base64url parts)".into());
        };
        let decode = |part: &str, what: &str| {
            b64.decode(part)
                .map_err(|e| format!("its {what} is not base64url: {e}"))
        };
        let header: Value = serde_json::from_slice(&decode(head, "header")?)
            .map_err(|e| format!("its header is not JSON: {e}"))?;
        if header["alg"] != "ES256" || header["typ"] != typ {
            return Err(format!(
                "its header says alg {} typ {}, not ES256 {typ}",
                header["alg"], header["typ"]
            ));
        }
        let kid = header["kid"].as_str().unwrap_or_default();
        let Some((_, key)) = self.keys.iter().find(|(k, _)| k == kid) else {
            return Err(format!(
                "signed with key {kid:?}, which the key set given does not hold (a node CA \
                 renewed since? add its earlier key)"
            ));
        };
        let sig = p256::ecdsa::Signature::from_slice(&decode(sig, "signature")?)
            .map_err(|e| format!("its signature is malformed: {e}"))?;
        key.verify(format!("{head}.{body}").as_bytes(), &sig)
            .map_err(|_| format!("its signature does not verify with key {kid}"))?;
        serde_json::from_slice(&decode(body, "payload")?)
            .map_err(|e| format!("its payload is not JSON: {e}"))
    }
}

fn files_digest(cert: &str, key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(cert.len().to_le_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

/// How long before the CA's end the daemon starts warning.
const CA_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// Reads the CA key file, refusing one that another user could read or own: checked on the
/// open file (no window between the check and the read), whatever links led to it (a
/// Kubernetes secret volume is links).
fn read_private(path: &Path) -> Result<String, Error> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut file = std::fs::File::open(path).map_err(file_err(path))?;
    let meta = file.metadata().map_err(file_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyExposed {
            path: path.to_owned(),
            mode,
        });
    }
    let owner = meta.uid();
    if owner != 0 && owner != nix::unistd::geteuid().as_raw() {
        return Err(Error::KeyForeign {
            path: path.to_owned(),
            owner,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(file_err(path))?;
    Ok(text)
}

/// Whether `cert` can issue certificates now: a CA (basic constraints), allowed to sign
/// certificates (key usage, when it says), within its validity. Its `notAfter`.
fn usable_as_ca(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    now: SystemTime,
) -> Result<SystemTime, String> {
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err("it is not a CA certificate (basic constraints without cA)".to_owned());
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err("its key usage does not allow signing certificates (keyCertSign)".to_owned());
    }
    valid_at(cert, now)
}

/// When `cert` stops being valid, if it is valid at `now`.
fn valid_at(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    now: SystemTime,
) -> Result<SystemTime, String> {
    let at = |t: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let (not_before, not_after) = (
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    );
    let stamp = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if now < not_before {
        return Err(format!(
            "it is valid only from {} (is this node's clock right?)",
            stamp(not_before)
        ));
    }
    if now >= not_after {
        return Err(format!(
            "it expired at {}; renew it (`interceptor ca init` makes a new one) and restart",
            stamp(not_after)
        ));
    }
    Ok(not_after)
}

/// Hex of the first 8 bytes.
fn hex16(bytes: &[u8]) -> String {
    crate::audit::hex(&bytes[..bytes.len().min(8)])
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random identifier (128 bits, hex) for `jti`.
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    // The OS RNG does not fail on Linux >= 3.17 once seeded; fall back to time if it ever does.
    if getrandom::fill(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = t.to_le_bytes();
    }
    crate::audit::hex(&b)
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::{Signature, VerifyingKey, signature::Verifier};

    use super::*;

    fn ca(dir: &Path, ttl: &str) -> NodeCa {
        let (cert, key) = init(dir, "test-node").unwrap();
        NodeCa::load(&RawCa {
            cert,
            key,
            leaf_ttl: ttl.into(),
        })
        .unwrap()
    }

    #[test]
    fn an_assertion_never_passes_for_a_checkpoint_nor_the_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "1h");
        let jwks = Jwks::parse(&ca.jwks().to_string()).unwrap();
        let claims = json!({"through_seq": 1, "through_hash": "00"});
        let assertion = ca.sign(&claims);
        let checkpoint = ca.checkpoint_signer().sign(&claims);
        assert_eq!(jwks.verify(&checkpoint, CHECKPOINT_TYP).unwrap(), claims);
        assert_eq!(jwks.verify(&assertion, ASSERTION_TYP).unwrap(), claims);
        let e = jwks.verify(&assertion, CHECKPOINT_TYP).unwrap_err();
        assert!(e.contains("not ES256 interceptor-audit-checkpoint"), "{e}");
        assert!(jwks.verify(&checkpoint, ASSERTION_TYP).is_err());
        // A signature over other claims (the payload swapped) does not verify.
        let mut parts: Vec<&str> = checkpoint.split('.').collect();
        let other = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"through_seq": 2, "through_hash": "00"}).to_string());
        parts[1] = &other;
        let e = jwks.verify(&parts.join("."), CHECKPOINT_TYP).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        assert!(Jwks::parse("{\"keys\": []}").is_err());
    }

    #[test]
    fn init_writes_a_private_key_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (_, key) = init(dir.path(), "n").unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(init(dir.path(), "n").is_err());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = NodeCa::load(&RawCa {
            cert: dir.path().join("ca.pem"),
            key,
            leaf_ttl: "1h".into(),
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    /// Writes a CA made from `params` (and, after it, `extra` PEM) to `dir`; loads it.
    fn load_made(
        dir: &Path,
        params: CertificateParams,
        extra: &str,
        ttl: &str,
    ) -> Result<NodeCa, Error> {
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert_path, format!("{}{extra}", cert.pem())).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        NodeCa::load(&RawCa {
            cert: cert_path,
            key: key_path,
            leaf_ttl: ttl.into(),
        })
    }

    fn ca_params(days: (i64, i64)) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days.0);
        params.not_after = now + time::Duration::days(days.1);
        params
    }

    #[test]
    fn a_ca_that_cannot_issue_now_is_refused_and_leaves_end_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let refused = |params, needle: &str| {
            let e = load_made(d, params, "", "1h").err().expect("refused");
            assert!(e.to_string().contains(needle), "{e}");
        };
        refused(ca_params((-10, -1)), "expired at");
        refused(ca_params((1, 10)), "valid only from");
        let mut leaf_like = ca_params((-1, 10));
        leaf_like.is_ca = IsCa::NoCa;
        refused(leaf_like, "not a CA certificate");
        let mut no_signing = ca_params((-1, 10));
        no_signing.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        refused(no_signing, "keyCertSign");
        // A subject with a repeated attribute type (an Active Directory issuing CA's
        // `DC=corp, DC=example`): rcgen keeps one value per type, so its leaves would name
        // another issuer.
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/DC=corp/DC=example/CN=Issuing CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=keyCertSign",
                "-days",
                "10",
                "-keyout",
                "dc-key.pem",
                "-out",
                "dc.pem",
            ])
            .current_dir(d)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "{out:?}");
        std::fs::set_permissions(d.join("dc-key.pem"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let e = NodeCa::load(&RawCa {
            cert: d.join("dc.pem"),
            key: d.join("dc-key.pem"),
            leaf_ttl: "1h".into(),
        })
        .err()
        .expect("refused");
        assert!(e.to_string().contains("cannot be reproduced"), "{e}");

        // A CA with an hour left: a leaf asked to live a day ends with it, and the
        // certificates after the CA's in its file follow it in every chain.
        let mut short = ca_params((-1, 0));
        short.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let above = KeyPair::generate().unwrap();
        let above = ca_params((-1, 10)).self_signed(&above).unwrap();
        let ca = load_made(d, short, &above.pem(), "24h").unwrap();
        let leaf = ca.leaf("spiffe://example.org/w").unwrap();
        assert_eq!(leaf.not_after, ca.not_after());
        // Once the CA has ended, nothing is minted (a leaf would end before it starts).
        let e = ca
            .mint(
                "spiffe://example.org/w",
                ca.not_after() + Duration::from_secs(1),
            )
            .err()
            .expect("refused");
        assert!(e.to_string().contains("the node CA expired at"), "{e}");
        assert!(leaf.not_after <= SystemTime::now() + Duration::from_secs(3_601));
        assert_eq!(leaf.chain.len(), 3);
        assert_eq!(leaf.chain[2].as_ref(), above.der().as_ref());
        assert_eq!(
            ca.mints.load(Ordering::Relaxed),
            1,
            "the load's probe is not counted"
        );

        // A certificate above the CA ends the chain too: an expired one is refused, one
        // ending first caps the leaves.
        let expired = KeyPair::generate().unwrap();
        let expired = ca_params((-10, -1)).self_signed(&expired).unwrap();
        let e = load_made(d, ca_params((-1, 10)), &expired.pem(), "24h")
            .err()
            .expect("refused");
        assert!(
            e.to_string().contains("certificate 1 above the CA")
                && e.to_string().contains("expired"),
            "{e}"
        );
        let mut soon = ca_params((-1, 0));
        soon.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
        let soon = soon.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let ca = load_made(d, ca_params((-1, 10)), &soon.pem(), "24h").unwrap();
        let leaf = ca.leaf("spiffe://example.org/w").unwrap();
        assert!(leaf.not_after <= SystemTime::now() + Duration::from_secs(2 * 3_600 + 1));
    }

    #[test]
    fn a_reload_tells_a_ca_whose_files_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = init(&dir.path().join("a"), "n").unwrap();
        let raw = RawCa {
            cert: cert.clone(),
            key: key.clone(),
            leaf_ttl: "1h".into(),
        };
        let ca = NodeCa::load(&raw).unwrap();
        assert!(!ca.files_changed(&raw));
        // Renewed in place: another CA at the same paths.
        let (other, other_key) = init(&dir.path().join("b"), "n").unwrap();
        std::fs::copy(&other, &cert).unwrap();
        std::fs::copy(&other_key, &key).unwrap();
        assert!(ca.files_changed(&raw));
        std::fs::remove_file(&key).unwrap();
        assert!(ca.files_changed(&raw));
    }

    #[test]
    fn a_key_another_user_owns_is_refused() {
        // Giving a file away takes root (as the daemon runs); as another user there is
        // nothing to give.
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: a key another user owns cannot be made, nothing checked");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = init(dir.path(), "n").unwrap();
        nix::unistd::chown(&key, Some(nix::unistd::Uid::from_raw(65_534)), None).unwrap();
        let e = NodeCa::load(&RawCa {
            cert,
            key,
            leaf_ttl: "1h".into(),
        })
        .err()
        .expect("refused");
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
    }

    #[test]
    fn leaves_carry_the_workload_id_and_are_cached_until_stale() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "1h");
        let a = ca
            .leaf("spiffe://example.org/node/n/cgroup/a/uid/1")
            .unwrap();
        let again = ca
            .leaf("spiffe://example.org/node/n/cgroup/a/uid/1")
            .unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let b = ca
            .leaf("spiffe://example.org/node/n/cgroup/b/uid/1")
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(ca.mints.load(Ordering::Relaxed), 2);
        let (_, cert) = x509_parser::parse_x509_certificate(&a.chain[0]).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, vec!["spiffe://example.org/node/n/cgroup/a/uid/1"]);
    }

    #[test]
    fn a_sec1_key_from_openssl_is_accepted_and_a_foreign_key_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-out",
            "sec1.pem",
        ]);
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "sec1.pem",
            "-subj",
            "/CN=org intermediate",
            "-days",
            "2",
            "-out",
            "ca.pem",
        ]);
        let text = std::fs::read_to_string(d.join("sec1.pem")).unwrap();
        assert!(text.contains("BEGIN EC PRIVATE KEY"), "{text}");
        std::fs::set_permissions(d.join("sec1.pem"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let raw = |key: &str| RawCa {
            cert: d.join("ca.pem"),
            key: d.join(key),
            leaf_ttl: "1h".into(),
        };
        let ca = NodeCa::load(&raw("sec1.pem")).unwrap();
        let leaf = ca.leaf("spiffe://x/w").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.chain[0]).unwrap();
        assert_eq!(cert.issuer().to_string(), "CN=org intermediate");
        // Another key than the certificate's is refused with the reason.
        let (_, other) = init(&d.join("other"), "n").unwrap();
        let e = NodeCa::load(&raw(other.to_str().unwrap())).err().unwrap();
        assert!(
            e.to_string()
                .contains("is not the key of the CA certificate"),
            "{e}"
        );
    }

    #[test]
    fn a_leaf_is_judged_by_the_expiry_its_certificate_states() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "2s");
        let before = SystemTime::now();
        let leaf = ca.leaf("spiffe://x/w").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.chain[0]).unwrap();
        let stated = UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp() as u64);
        assert_eq!(leaf.not_after, stated);
        assert!(stated >= before + Duration::from_secs(2));
        assert!(stated < SystemTime::now() + Duration::from_secs(3));
    }

    #[test]
    fn a_leaf_minted_before_the_clock_stepped_back_is_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "1h");
        let now = SystemTime::now();
        // Minted while the clock ran an hour ahead: not valid before then (less 30 s).
        let ahead = ca
            .mint("spiffe://x/w", now + Duration::from_secs(3600))
            .unwrap();
        assert!(!ahead.fresh(now), "valid only in an hour: renew");
        assert!(ahead.fresh(now + Duration::from_secs(3600 - 20)));
        assert!(ca.mint("spiffe://x/w", now).unwrap().fresh(now));
    }

    #[test]
    fn short_lived_leaves_are_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "1s");
        let a = ca.leaf("spiffe://x/w").unwrap();
        let life = a.not_after.duration_since(a.minted).unwrap();
        assert!(
            Arc::ptr_eq(&a, &ca.leaf("spiffe://x/w").unwrap()),
            "still fresh"
        );
        // Its expiry is whole seconds: a third of what it states is left from here.
        sleep_until(a.not_after - life / 3 + Duration::from_millis(20));
        let b = ca.leaf("spiffe://x/w").unwrap();
        assert!(
            !Arc::ptr_eq(&a, &b),
            "a leaf with a third of its life left must be renewed"
        );
    }

    #[test]
    fn expired_leaves_leave_the_cache_when_another_is_minted() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "2s");
        let gone = ca.leaf("spiffe://x/gone").unwrap().not_after;
        let gone = gone.max(ca.leaf("spiffe://x/also-gone").unwrap().not_after);
        // Minted 1.5 s before those expire: due for renewal when they have, but still valid
        // (2 s at least from its mint).
        sleep_until(gone - Duration::from_millis(1500));
        ca.leaf("spiffe://x/aging").unwrap();
        sleep_until(gone + Duration::from_millis(50));
        ca.leaf("spiffe://x/new").unwrap();
        ca.leaf("spiffe://x/newer").unwrap();
        let mut cached: Vec<String> = lock(&ca.cache).ids().cloned().collect();
        cached.sort();
        assert_eq!(
            cached,
            ["spiffe://x/aging", "spiffe://x/new", "spiffe://x/newer"]
        );
    }

    #[test]
    fn the_oldest_leaves_go_beyond_the_workload_cap() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "1h");
        for i in 0..MAX_WORKLOADS + 2 {
            ca.leaf(&format!("spiffe://x/w{i}")).unwrap();
            // Distinct mint times.
            std::thread::sleep(Duration::from_millis(2));
        }
        let cache = lock(&ca.cache);
        assert_eq!(cache.map.len(), MAX_WORKLOADS);
        assert!(cache.get("spiffe://x/w0").is_none() && cache.get("spiffe://x/w1").is_none());
        assert!(
            cache
                .get(&format!("spiffe://x/w{}", MAX_WORKLOADS + 1))
                .is_some()
        );
    }

    #[test]
    fn a_full_workload_map_drops_its_oldest_sixteenth_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "1h");
        let t0 = SystemTime::now();
        let leaves: Vec<Arc<Leaf>> = (0..40u64)
            .map(|i| {
                Arc::new(
                    ca.mint("spiffe://x/w", t0 + Duration::from_secs(i))
                        .unwrap(),
                )
            })
            .collect();
        let mut map = ByWorkload::with_limits(32, Duration::from_secs(10));
        let ids = |map: &ByWorkload<Arc<Leaf>>| {
            let mut ids: Vec<usize> = map.ids().map(|k| k[1..].parse().unwrap()).collect();
            ids.sort();
            ids
        };
        // Inserted newest first: the order of insertion is not what ages them.
        for i in (0..32).rev() {
            map.insert(format!("w{i}"), leaves[i].clone(), t0, |l| l);
        }
        assert_eq!(ids(&map), (0..32).collect::<Vec<_>>());
        // Full: a new workload makes room by dropping the two oldest (32 / 16).
        map.insert("w32".into(), leaves[32].clone(), t0, |l| l);
        assert_eq!(ids(&map), (2..33).collect::<Vec<_>>());
        // Then the next one fits without dropping any...
        map.insert("w33".into(), leaves[33].clone(), t0, |l| l);
        assert_eq!(ids(&map), (2..34).collect::<Vec<_>>());
        // ...and renewing one held never drops another.
        map.insert("w5".into(), leaves[34].clone(), t0, |l| l);
        assert_eq!(ids(&map), (2..34).collect::<Vec<_>>());
        assert!(Arc::ptr_eq(map.get("w5").unwrap(), &leaves[34]));
    }

    #[test]
    fn expired_workloads_go_at_most_every_sweep_interval() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "1h");
        let t0 = SystemTime::now();
        // Expired an hour before t0; valid through t0 + 1 h.
        let gone = Arc::new(
            ca.mint("spiffe://x/w", t0 - Duration::from_secs(7200))
                .unwrap(),
        );
        let live = Arc::new(ca.mint("spiffe://x/w", t0).unwrap());
        assert!(gone.expired(t0) && !live.expired(t0 + Duration::from_secs(10)));
        let mut map = ByWorkload::with_limits(32, Duration::from_secs(10));
        // The first insert sweeps (none swept yet), then holds the expired one.
        map.insert("old".into(), gone.clone(), t0, |l| l);
        // Less than 10 s since that sweep: the expired one stays.
        map.insert("a".into(), live.clone(), t0 + Duration::from_secs(5), |l| l);
        assert!(map.get("old").is_some());
        // 10 s on, a sweep drops it, and only it.
        map.insert(
            "b".into(),
            live.clone(),
            t0 + Duration::from_secs(10),
            |l| l,
        );
        let mut ids: Vec<&String> = map.ids().collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        // A clock stepped back counts as due: an expired one inserted goes at the next insert.
        map.insert("old".into(), gone, t0 + Duration::from_secs(11), |l| l);
        map.insert("c".into(), live, t0, |l| l);
        assert!(map.get("old").is_none());
        assert_eq!(map.ids().count(), 3);
    }

    #[test]
    fn assertions_verify_with_the_jwks() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "1h");
        let token = ca.sign(&json!({"sub": "spiffe://x/w", "aud": "notes"}));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let jwks = ca.jwks();
        let k = &jwks["keys"][0];
        assert_eq!(k["alg"], "ES256");
        let jwk = json!({"kty": k["kty"], "crv": k["crv"], "x": k["x"], "y": k["y"]}).to_string();
        let public = p256::PublicKey::from_jwk_str(&jwk).unwrap();
        let vk = VerifyingKey::from(public);
        let sig_bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        let sig = Signature::from_slice(&sig_bytes).unwrap();
        vk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
        assert_eq!(random_id().len(), 32);
        assert_ne!(random_id(), random_id());
    }
}
