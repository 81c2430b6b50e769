//! A real MCP peer built on the official Rust SDK (`rmcp`), over Streamable HTTP.
//!
//! `rmcp-peer server ADDR CALLS_FILE`: serve tools `read_note`, `search`, `delete_note` and
//! `write_note`; every executed call is appended to CALLS_FILE.
//! `rmcp-peer server-tls ADDR CALLS_FILE CERT KEY CLIENT_CA SEEN_FILE`: the same behind a rustls
//! acceptor that requires a client certificate from CLIENT_CA; for every request it appends to
//! SEEN_FILE a JSON line with the client certificate's URI SANs and the identity-related headers.
//! `rmcp-peer client URL [NAME=JSON …]`: list tools, call each, print one JSON object with what
//! happened (the same shape as `tests/peers/mcp_client.py`).
//! The server speaks the tasks extension (SEP-2663): a client that declares it gets `search`
//! as a task. `rmcp-peer task-call URL NAME`: such a client; calls NAME and prints
//! `{"task_id": …}` (or the error). `rmcp-peer task-get URL TASK_ID`: `tasks/get` of that id
//! (any task the server holds: it binds tasks to no one), prints the task or the error.

use std::{
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rmcp::{
    ErrorData, RoleServer, ServerHandler, ServiceExt,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
        ContentBlock, CreateTaskResult, GetTaskParams, GetTaskResult, ListToolsResult,
        PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    },
    service::{RequestContext, ServiceError},
    task_manager::{TaskManager, TaskOptions},
    transport::{
        StreamableHttpClientTransport,
        streamable_http_server::{
            StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
        },
    },
};
use serde_json::{Map, Value, json};

#[derive(Clone)]
struct Notes {
    calls: Arc<Mutex<PathBuf>>,
    /// Tasks of every session (bound to no caller: the proxy must tell callers apart).
    tasks: TaskManager,
}

const TOOLS: [&str; 4] = ["read_note", "search", "delete_note", "write_note"];

impl ServerHandler for Notes {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .build(),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema: Map<String, Value> =
            serde_json::from_value(json!({"type": "object"})).unwrap_or_default();
        let schema = Arc::new(schema);
        Ok(ListToolsResult {
            tools: TOOLS
                .iter()
                .map(|name| Tool::new(*name, format!("the {name} tool"), schema.clone()))
                .collect(),
            ..Default::default()
        })
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        self.tasks
            .get_task(&request.task_id)
            .map(GetTaskResult::new)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if !TOOLS.contains(&request.name.as_ref()) {
            return Err(ErrorData::invalid_params(
                format!("Unknown tool: {}", request.name),
                None,
            ));
        }
        let path = self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{}", request.name);
        }
        if request.name == "search"
            && context
                .client_capabilities()
                .is_some_and(|c| c.supports_tasks())
        {
            let task = self.tasks.spawn(TaskOptions::new(), |_| {
                Box::pin(async {
                    Ok(CallToolResult::success(vec![ContentBlock::text(
                        "search done (task)",
                    )]))
                })
            });
            return Ok(CallToolResponse::Task(CreateTaskResult::new(task)));
        }
        Ok(
            CallToolResult::success(vec![ContentBlock::text(format!("{} done", request.name))])
                .into(),
        )
    }
}

async fn server(addr: &str, calls: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let notes = Notes {
        calls: Arc::new(Mutex::new(calls)),
        tasks: TaskManager::new(),
    };
    let mut config = StreamableHttpServerConfig::default();
    // Agents dial the server's own address; any loopback Host is fine for the test.
    config.allowed_hosts = vec!["127.0.0.1".into(), "localhost".into()];
    let service: StreamableHttpService<Notes, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(notes.clone()), Default::default(), config);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct TlsArgs {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    seen: PathBuf,
}

async fn server_tls(
    addr: &str,
    calls: PathBuf,
    tls: TlsArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    let acceptor = interceptor_tests::mtls_acceptor(&tls.cert, &tls.key, &tls.client_ca);
    let notes = Notes {
        calls: Arc::new(Mutex::new(calls)),
        tasks: TaskManager::new(),
    };
    let mut config = StreamableHttpServerConfig::default();
    config.allowed_hosts = vec!["127.0.0.1".into(), "localhost".into(), "notes.test".into()];
    let service: StreamableHttpService<Notes, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(notes.clone()), Default::default(), config);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let seen = Arc::new(tls.seen);
    loop {
        let (stream, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let service = service.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            // A client without an acceptable certificate fails here.
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let sans: Vec<String> = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| x509_parser::parse_x509_certificate(c).ok())
                .and_then(|(_, cert)| {
                    cert.subject_alternative_name().ok().flatten().map(|san| {
                        san.value
                            .general_names
                            .iter()
                            .filter_map(|g| match g {
                                x509_parser::extensions::GeneralName::URI(u) => {
                                    Some((*u).to_owned())
                                }
                                _ => None,
                            })
                            .collect()
                    })
                })
                .unwrap_or_default();
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let line = json!({
                        "client_uri_sans": sans,
                        "identity": header("interceptor-identity"),
                        "authorization": header("authorization"),
                        "x_api_key": header("x-api-key"),
                        "content_type": header("content-type"),
                        "x_forwarded_for": header("x-forwarded-for"),
                        "forwarded": header("forwarded"),
                        // Names a CGI-style gateway reads as the ones above.
                        "identity_underscored": header("interceptor_identity"),
                        "x_api_key_underscored": header("x_api_key"),
                        "session_underscored": header("mcp_session_id"),
                        "client_cert": header("client-cert"),
                        "x_ssl_client_verify": header("x-ssl-client-verify"),
                        // Whom an authenticating front proxy vouches for, and overrides of
                        // the request's own method.
                        "x_remote_user": header("x-remote-user"),
                        "impersonate_user": header("impersonate-user"),
                        "x_auth_request_email": header("x-auth-request-email"),
                        "x_http_method_override": header("x-http-method-override"),
                        "x_envoy_original_dst_host": header("x-envoy-original-dst-host"),
                        "method": req.method().as_str(),
                        "target": req.uri().path_and_query().map(|p| p.as_str()),
                    });
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(seen.as_ref())
                    {
                        let _ = writeln!(f, "{line}");
                    }
                    // A misbehaving server: quotes the key and the identity assertion it was
                    // sent, in a header and the body.
                    let echo = (req.uri().path() == "/echo-key").then(|| {
                        (
                            header("x-api-key").unwrap_or_default(),
                            header("interceptor-identity").unwrap_or_default(),
                        )
                    });
                    let mut service = service.clone();
                    let answer = tower_service::Service::call(&mut service, req);
                    async move {
                        let Some((key, assertion)) = echo else {
                            return answer.await;
                        };
                        let body = http_body_util::Full::new(bytes::Bytes::from(format!(
                            "invalid key {key} for {assertion}"
                        )));
                        Ok(hyper::Response::builder()
                            .header("content-type", "text/plain")
                            .header("x-rejected-key", key)
                            .header("x-rejected-identity", assertion)
                            .body(http_body_util::BodyExt::boxed(body))
                            .expect("response"))
                    }
                });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn client(url: &str, calls: &[String]) -> Value {
    let transport = StreamableHttpClientTransport::from_uri(url.to_owned());
    let peer = match ().serve(transport).await {
        Ok(p) => p,
        Err(e) => return json!({"pid": std::process::id(), "fatal": e.to_string()}),
    };
    let mut out = json!({"pid": std::process::id(), "calls": {}});
    match peer.list_all_tools().await {
        Ok(tools) => {
            let mut names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
            names.sort();
            out["tools"] = json!(names);
        }
        Err(e) => out["fatal"] = json!(format!("tools/list: {e}")),
    }
    for spec in calls {
        let (name, raw) = spec.split_once('=').unwrap_or((spec, "{}"));
        let arguments: Option<Map<String, Value>> = serde_json::from_str(raw).ok();
        let mut params = CallToolRequestParams::new(name.to_owned());
        params.arguments = arguments;
        out["calls"][name] = match peer.call_tool(params).await {
            Ok(r) => {
                let text: Vec<String> = r
                    .content
                    .iter()
                    .filter_map(|c| c.as_text().map(|t| t.text.clone()))
                    .collect();
                json!({"ok": !r.is_error.unwrap_or(false), "text": text.join(" ")})
            }
            Err(ServiceError::McpError(e)) => {
                json!({"ok": false, "code": e.code.0, "message": e.message})
            }
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        };
    }
    let _ = peer.cancel().await;
    out
}

/// A client that declares the tasks extension.
async fn task_client(
    url: &str,
) -> Result<rmcp::service::RunningService<rmcp::RoleClient, ClientConfig>, String> {
    let transport = StreamableHttpClientTransport::from_uri(url.to_owned());
    let mut info = ClientConfig::default();
    info.capabilities = ClientCapabilities::builder().enable_tasks().build();
    info.serve(transport).await.map_err(|e| e.to_string())
}

fn error_json(e: ServiceError) -> Value {
    match e {
        ServiceError::McpError(e) => json!({"code": e.code.0, "message": e.message}),
        e => json!({"error": e.to_string()}),
    }
}

/// `task-call`: NAME called by a client that takes tasks.
async fn task_call(url: &str, name: &str) -> Value {
    let peer = match task_client(url).await {
        Ok(p) => p,
        Err(e) => return json!({"fatal": e}),
    };
    let out = match peer
        .call_tool_once(CallToolRequestParams::new(name.to_owned()))
        .await
    {
        Ok(CallToolResponse::Task(t)) => json!({"task_id": t.task.task_id}),
        Ok(other) => json!({"not_a_task": format!("{other:?}")}),
        Err(e) => error_json(e),
    };
    let _ = peer.cancel().await;
    out
}

/// `task-get`: `tasks/get` of TASK_ID.
async fn task_get(url: &str, task_id: &str) -> Value {
    let peer = match task_client(url).await {
        Ok(p) => p,
        Err(e) => return json!({"fatal": e}),
    };
    let out = match peer.get_task(GetTaskParams::new(task_id.to_owned())).await {
        Ok(task) => json!({"task": task}),
        Err(e) => error_json(e),
    };
    let _ = peer.cancel().await;
    out
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("server") if args.len() == 3 => {
            if let Err(e) = server(&args[1], PathBuf::from(&args[2])).await {
                eprintln!("rmcp-peer server: {e}");
                std::process::exit(1);
            }
        }
        Some("server-tls") if args.len() == 7 => {
            let tls = TlsArgs {
                cert: PathBuf::from(&args[3]),
                key: PathBuf::from(&args[4]),
                client_ca: PathBuf::from(&args[5]),
                seen: PathBuf::from(&args[6]),
            };
            if let Err(e) = server_tls(&args[1], PathBuf::from(&args[2]), tls).await {
                eprintln!("rmcp-peer server-tls: {e}");
                std::process::exit(1);
            }
        }
        Some("task-call") if args.len() == 3 => println!("{}", task_call(&args[1], &args[2]).await),
        Some("task-get") if args.len() == 3 => println!("{}", task_get(&args[1], &args[2]).await),
        Some("client") if args.len() >= 2 => {
            let out = client(&args[1], &args[2..]).await;
            println!("{out}");
            if out.get("fatal").is_some() {
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!(
                "usage: rmcp-peer server ADDR CALLS_FILE | rmcp-peer client URL [NAME=JSON …]"
            );
            std::process::exit(2);
        }
    }
}
