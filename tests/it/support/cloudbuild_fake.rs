//! A fake Google Cloud Build and Cloud Storage JSON API, because neither
//! has an emulator that runs builds.
//!
//! Written from the public REST references, for what absconda uses:
//! - Cloud Storage JSON API: `objects.insert` as a media upload
//!   (`POST /upload/storage/v1/b/{bucket}/o?uploadType=media&name=…`) and as
//!   a resumable upload (the POST with `uploadType=resumable` answers 200
//!   with the session URI in `Location`; `PUT` chunks with
//!   `Content-Range: bytes A-B/TOTAL`, each but the last a multiple of
//!   256 KiB, answered 308 with `Range: bytes=0-N` until the last, which
//!   answers 200 with the object; `Content-Range: bytes */TOTAL` asks for
//!   the status); `objects.get?alt=media` with `Range` (206, 416 past the
//!   end, 404 before the object exists); `objects.delete` (204).
//! - Cloud Build v1: `projects.locations.builds.create` answering an
//!   Operation whose `metadata` (`@type` BuildOperationMetadata) holds the
//!   Build (`id`, `status: QUEUED`, `logsBucket: gs://…`, `createTime`);
//!   `builds.get` (QUEUED → WORKING with `startTime`, then the status the
//!   test sets, with `finishTime` and `failureInfo`); `builds.cancel`
//!   (`POST …/builds/{id}:cancel`, status CANCELLED). The build's log is the
//!   object `log-{id}.txt` in the logs bucket, appended to by the test.
//! - Every request must carry a Bearer token the GCE fake's token endpoint
//!   minted (401 `UNAUTHENTICATED` otherwise); errors are Google's JSON.
//!
//! Faults: a number of upload chunks answered 503.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::ws_server::{self, Upgrade};

pub const LOGS_BUCKET: &str = "absconda-test-cloudbuild-logs";
const QUANTUM: usize = 256 * 1024;

type Check = Box<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Default)]
struct State {
    objects: BTreeMap<(String, String), Vec<u8>>,
    /// upload id → (bucket, name, declared size, bytes so far)
    sessions: BTreeMap<String, (String, String, usize, Vec<u8>)>,
    builds: BTreeMap<String, Value>,
    /// The Build bodies `builds.create` received.
    created: Vec<Value>,
    cancelled: Vec<String>,
    /// `(method, path and query, content-type)` of every request.
    log: Vec<(String, String, String)>,
    outcome: Option<(String, Option<String>)>,
    fail_chunks: usize,
    unauthorized: usize,
}

pub struct CloudBuildFake {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl CloudBuildFake {
    /// `authorized` says whether an `Authorization` header is valid.
    pub fn start(authorized: impl Fn(&str) -> bool + Send + Sync + 'static) -> CloudBuildFake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the Cloud Build fake");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let check: Arc<Check> = Arc::new(Box::new(authorized));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (st, check) = (st.clone(), check.clone());
                std::thread::spawn(move || serve(conn, addr, &st, &check));
            }
        });
        CloudBuildFake { addr, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn objects(&self, bucket: &str) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.objects
            .keys()
            .filter(|(b, _)| b == bucket)
            .map(|(_, n)| n.clone())
            .collect()
    }

    pub fn object(&self, bucket: &str, name: &str) -> Option<Vec<u8>> {
        let st = self.state.lock().unwrap();
        st.objects.get(&(bucket.into(), name.into())).cloned()
    }

    pub fn created(&self) -> Vec<Value> {
        self.state.lock().unwrap().created.clone()
    }

    pub fn build_ids(&self) -> Vec<String> {
        self.state.lock().unwrap().builds.keys().cloned().collect()
    }

    pub fn cancelled(&self) -> Vec<String> {
        self.state.lock().unwrap().cancelled.clone()
    }

    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn unauthorized(&self) -> usize {
        self.state.lock().unwrap().unauthorized
    }

    /// Appends to the build's log object, as Cloud Build's step output does.
    pub fn append_log(&self, id: &str, text: &str) {
        let mut st = self.state.lock().unwrap();
        st.objects
            .entry((LOGS_BUCKET.into(), format!("log-{id}.txt")))
            .or_default()
            .extend_from_slice(text.as_bytes());
    }

    /// Builds still running end with `status` (and `failureInfo.type`).
    pub fn finish(&self, status: &str, failure: Option<&str>) {
        self.state.lock().unwrap().outcome =
            Some((status.to_string(), failure.map(str::to_string)));
    }

    pub fn reopen(&self) {
        self.state.lock().unwrap().outcome = None;
    }

    /// The next `n` resumable chunks are answered 503.
    pub fn fail_chunks(&self, n: usize) {
        self.state.lock().unwrap().fail_chunks = n;
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn json_reply(status: u16, v: &Value) -> Reply {
    Reply {
        status,
        headers: vec![(
            "Content-Type".into(),
            "application/json; charset=UTF-8".into(),
        )],
        body: serde_json::to_vec(v).unwrap(),
    }
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    json_reply(
        status,
        &json!({"error": {"code": status, "message": message, "status": code}}),
    )
}

fn serve(conn: TcpStream, addr: SocketAddr, st: &Mutex<State>, check: &Check) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let Some(up) = ws_server::read_upgrade(&mut reader) else {
        return;
    };
    let length: usize = up
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let reply = route(&up, &body, addr, st, check);
    let reason = match reply.status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        reply.body.len()
    ));
    let _ = w.write_all(head.as_bytes());
    let _ = w.write_all(&reply.body);
}

fn route(up: &Upgrade, body: &[u8], addr: SocketAddr, st: &Mutex<State>, check: &Check) -> Reply {
    let mut s = st.lock().unwrap();
    s.log.push((
        up.method.clone(),
        up.target.clone(),
        up.header("content-type").unwrap_or_default().to_string(),
    ));
    if !check(up.header("authorization").unwrap_or_default()) {
        s.unauthorized += 1;
        return error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    let path = up.path().to_string();
    let segs: Vec<String> = path
        .split('/')
        .skip(1)
        .map(|p| {
            url::form_urlencoded::parse(format!("x={}", p.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (up.method.as_str(), segs.as_slice()) {
        // objects.insert
        ("POST", ["upload", "storage", "v1", "b", bucket, "o"]) => {
            let Some(name) = up.param("name") else {
                return error(400, "INVALID_ARGUMENT", "Required parameter: name");
            };
            match up.param("uploadType").as_deref() {
                Some("media") => {
                    let object = json!({"bucket": bucket, "name": name, "size": body.len().to_string(),
                        "contentType": up.header("content-type").unwrap_or("application/octet-stream")});
                    s.objects.insert((bucket.to_string(), name), body.to_vec());
                    json_reply(200, &object)
                }
                Some("resumable") => {
                    let Some(size) = up
                        .header("x-upload-content-length")
                        .and_then(|v| v.parse().ok())
                    else {
                        return error(
                            400,
                            "INVALID_ARGUMENT",
                            "X-Upload-Content-Length is required here",
                        );
                    };
                    let id = format!("upload-{}", s.sessions.len() + 1);
                    s.sessions
                        .insert(id.clone(), (bucket.to_string(), name, size, Vec::new()));
                    Reply {
                        status: 200,
                        headers: vec![(
                            "Location".into(),
                            format!(
                                "http://{addr}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={id}"
                            ),
                        )],
                        body: Vec::new(),
                    }
                }
                _ => error(400, "INVALID_ARGUMENT", "Invalid uploadType"),
            }
        }
        // A resumable upload's chunk or status query.
        ("PUT", ["upload", "storage", "v1", "b", _, "o"]) => {
            let Some(id) = up.param("upload_id") else {
                return error(400, "INVALID_ARGUMENT", "no upload_id");
            };
            let range = up.header("content-range").unwrap_or_default().to_string();
            let fail = s.fail_chunks > 0 && !range.starts_with("bytes */");
            if fail {
                s.fail_chunks -= 1;
                return error(503, "UNAVAILABLE", "Backend Error");
            }
            let Some((bucket, name, size, data)) = s.sessions.get_mut(&id) else {
                return error(404, "NOT_FOUND", "No such upload");
            };
            let incomplete = |have: usize| Reply {
                status: 308,
                headers: if have == 0 {
                    Vec::new()
                } else {
                    vec![("Range".into(), format!("bytes=0-{}", have - 1))]
                },
                body: Vec::new(),
            };
            let Some(spec) = range.strip_prefix("bytes ") else {
                return error(400, "INVALID_ARGUMENT", "Content-Range is required");
            };
            let (span, total) = spec.split_once('/').unwrap_or((spec, "*"));
            if total != size.to_string() {
                return error(400, "INVALID_ARGUMENT", "the total size changed");
            }
            if span == "*" {
                return incomplete(data.len());
            }
            let (a, b) = span.split_once('-').unwrap_or(("x", "x"));
            let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) else {
                return error(400, "INVALID_ARGUMENT", "bad Content-Range");
            };
            if b + 1 - a != body.len() || a > data.len() {
                return error(
                    400,
                    "INVALID_ARGUMENT",
                    "Content-Range does not match the body",
                );
            }
            let last = b + 1 == *size;
            if !last && !body.len().is_multiple_of(QUANTUM) {
                return error(
                    400,
                    "INVALID_ARGUMENT",
                    "chunk size must be a multiple of 256 KiB",
                );
            }
            data.truncate(a);
            data.extend_from_slice(body);
            if !last {
                return incomplete(data.len());
            }
            let (bucket, name, data) = (bucket.clone(), name.clone(), std::mem::take(data));
            s.sessions.remove(&id);
            let size = data.len();
            s.objects.insert((bucket.clone(), name.clone()), data);
            json_reply(
                200,
                &json!({"bucket": bucket, "name": name, "size": size.to_string()}),
            )
        }
        ("GET", ["storage", "v1", "b", bucket, "o", name]) => {
            if up.param("alt").as_deref() != Some("media") {
                return error(400, "INVALID_ARGUMENT", "only alt=media here");
            }
            let Some(data) = s.objects.get(&(bucket.to_string(), name.to_string())) else {
                return error(404, "NOT_FOUND", "No such object");
            };
            let Some(range) = up.header("range").and_then(|r| r.strip_prefix("bytes=")) else {
                return Reply {
                    status: 200,
                    headers: Vec::new(),
                    body: data.clone(),
                };
            };
            let (a, b) = range.split_once('-').unwrap_or((range, ""));
            let a: usize = a.parse().unwrap_or(0);
            if a >= data.len() {
                return error(
                    416,
                    "RANGE_NOT_SATISFIABLE",
                    "Requested range not satisfiable",
                );
            }
            let b = b
                .parse::<usize>()
                .map_or(data.len() - 1, |b| b.min(data.len() - 1));
            Reply {
                status: 206,
                headers: vec![(
                    "Content-Range".into(),
                    format!("bytes {a}-{b}/{}", data.len()),
                )],
                body: data[a..=b].to_vec(),
            }
        }
        ("DELETE", ["storage", "v1", "b", bucket, "o", name]) => {
            match s.objects.remove(&(bucket.to_string(), name.to_string())) {
                Some(_) => Reply {
                    status: 204,
                    headers: Vec::new(),
                    body: Vec::new(),
                },
                None => error(404, "NOT_FOUND", "No such object"),
            }
        }
        ("POST", ["v1", "projects", project, "locations", location, "builds"]) => {
            let Ok(mut build) = serde_json::from_slice::<Value>(body) else {
                return error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.");
            };
            if up
                .header("content-type")
                .is_none_or(|c| !c.starts_with("application/json"))
            {
                return error(400, "INVALID_ARGUMENT", "expected a JSON body");
            }
            if build["steps"].as_array().is_none_or(|s| s.is_empty()) {
                return error(400, "INVALID_ARGUMENT", "invalid build: no build steps");
            }
            let source = &build["source"]["storageSource"];
            let (Some(b), Some(o)) = (source["bucket"].as_str(), source["object"].as_str()) else {
                return error(400, "INVALID_ARGUMENT", "invalid build: no source");
            };
            if !s.objects.contains_key(&(b.to_string(), o.to_string())) {
                return error(
                    400,
                    "INVALID_ARGUMENT",
                    &format!("could not find source gs://{b}/{o}"),
                );
            }
            s.created.push(build.clone());
            let id = format!("{:08x}-0000-4000-8000-{:012x}", s.builds.len() + 1, 7);
            build["id"] = json!(id);
            build["projectId"] = json!(project);
            build["status"] = json!("QUEUED");
            build["createTime"] = json!(now());
            build["logsBucket"] = json!(format!("gs://{LOGS_BUCKET}"));
            build["name"] = json!(format!(
                "projects/{project}/locations/{location}/builds/{id}"
            ));
            s.builds.insert(id.clone(), build.clone());
            json_reply(
                200,
                &json!({
                    "name": format!("projects/{project}/locations/{location}/operations/op-{id}"),
                    "metadata": {
                        "@type": "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata",
                        "build": build,
                    }
                }),
            )
        }
        ("GET", ["v1", "projects", _, "locations", _, "builds", id]) => {
            let outcome = s.outcome.clone();
            let Some(build) = s.builds.get_mut(*id) else {
                return error(404, "NOT_FOUND", "Requested entity was not found.");
            };
            match (build["status"].as_str().unwrap_or_default(), outcome) {
                ("QUEUED", _) => {
                    build["status"] = json!("WORKING");
                    build["startTime"] = json!(now());
                }
                ("WORKING", Some((status, failure))) => {
                    build["status"] = json!(status);
                    build["finishTime"] = json!(now());
                    if let Some(f) = failure {
                        build["failureInfo"] = json!({"type": f, "detail": "failed"});
                    }
                }
                _ => {}
            }
            json_reply(200, build)
        }
        ("POST", ["v1", "projects", _, "locations", _, "builds", id_cancel]) => {
            let Some(id) = id_cancel.strip_suffix(":cancel") else {
                return error(404, "NOT_FOUND", "no such method");
            };
            let Some(build) = s.builds.get_mut(id) else {
                return error(404, "NOT_FOUND", "Requested entity was not found.");
            };
            if matches!(build["status"].as_str(), Some("QUEUED" | "WORKING")) {
                build["status"] = json!("CANCELLED");
                build["finishTime"] = json!(now());
            }
            let build = build.clone();
            s.cancelled.push(id.to_string());
            json_reply(200, &build)
        }
        _ => error(
            404,
            "NOT_FOUND",
            &format!("no route for {} {path}", up.method),
        ),
    }
}
