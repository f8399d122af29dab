//! Property-based fuzzing of the control API's request path, in-process and without KVM: random request
//! lines (objects with any command and any fields of any JSON type, huge and negative numbers, floats,
//! nulls, nesting, non-objects, truncated or corrupted lines, bytes that are not UTF-8) through
//! [`parse_request`], and sequences of such lines through [`serve_connection`] over a socket pair with a
//! backend that records what it was asked.
//!
//! Checked: the parser accepts a line exactly when a reference model of the protocol (the module
//! documentation of `vmm::api`) does, and to the same request; what it accepts serialises back to
//! itself; every error says something. The server answers every line that is not blank with exactly
//! one JSON reply line, in order (`ok` with a result, or not `ok` with an error), hands the backend
//! exactly the lines that parse, and is still answering at the end.
//!
//! `PROPTEST_CASES` sets the number of cases (`scripts/test` uses 4000).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use vmm::api::{parse_request, serve_connection, Backend, Reply, Request, MAX_TIMEOUT_SECS};

const COMMANDS: [&str; 6] = [
    "add-device",
    "remove-device",
    "list-devices",
    "info",
    "dma-test",
    "ping",
];
const FIELDS: [&str; 5] = ["path", "id", "timeout_secs", "force", "extra"];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        3 => "[a-z0-9:./_-]{0,24}".prop_map(Value::from),
        1 => any::<String>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => (0u64..100).prop_map(Value::from),
        1 => prop_oneof![
            Just(MAX_TIMEOUT_SECS),
            Just(MAX_TIMEOUT_SECS + 1),
            Just(u64::MAX),
            any::<u64>()
        ]
        .prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => prop_oneof![Just(5.0f64), Just(-1.5), Just(1e300), any::<f64>()]
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request object: a command (a known one, any string, another type, or none) and some fields.
fn request_value() -> impl Strategy<Value = Value> {
    let command = prop_oneof![
        6 => prop::sample::select(COMMANDS.to_vec()).prop_map(Value::from),
        1 => "[a-z-]{0,12}".prop_map(Value::from),
        1 => json_value(),
    ];
    let field_value = |name: &'static str| {
        let typical = match name {
            "path" | "id" => "[a-z0-9:./]{1,20}".prop_map(Value::from).boxed(),
            "timeout_secs" => prop_oneof![
                0u64..120,
                Just(MAX_TIMEOUT_SECS),
                Just(MAX_TIMEOUT_SECS + 1),
                Just(u64::MAX)
            ]
            .prop_map(Value::from)
            .boxed(),
            "force" => any::<bool>().prop_map(Value::from).boxed(),
            _ => json_value().boxed(),
        };
        prop_oneof![3 => typical, 1 => json_value()]
    };
    let fields = (
        prop::option::weighted(0.5, field_value("path")),
        prop::option::weighted(0.5, field_value("id")),
        prop::option::weighted(0.3, field_value("timeout_secs")),
        prop::option::weighted(0.3, field_value("force")),
        prop::option::weighted(0.1, field_value("extra")),
    );
    (prop::option::weighted(0.95, command), fields).prop_map(|(command, f)| {
        let mut m = Map::new();
        if let Some(c) = command {
            m.insert("command".into(), c);
        }
        for (name, v) in FIELDS.iter().zip([f.0, f.1, f.2, f.3, f.4]) {
            if let Some(v) = v {
                m.insert((*name).into(), v);
            }
        }
        Value::Object(m)
    })
}

/// A request line: a request object (spaced or not), another JSON value, or a damaged line.
fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => (request_value(), any::<bool>()).prop_map(|(v, pretty)| {
            let s = if pretty { format!("  {v:#}  ").replace('\n', " ") } else { v.to_string() };
            s.into_bytes()
        }),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        // Cut short, or with a byte replaced (possibly by one that is not UTF-8).
        2 => (request_value(), any::<prop::sample::Index>(), any::<u8>(), any::<bool>())
            .prop_map(|(v, at, b, cut)| {
                let mut s = v.to_string().into_bytes();
                let i = at.index(s.len());
                if cut { s.truncate(i) } else { s[i] = b }
                s.retain(|&c| c != b'\n');
                s
            }),
        1 => prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|mut v| { v.retain(|&c| c != b'\n'); v }),
    ]
}

/// The protocol as documented: the request a JSON value stands for, if any.
fn model(v: &Value) -> Option<Request> {
    let obj = v.as_object()?;
    let cmd = obj.get("command")?.as_str()?;
    let allowed: &[&str] = match cmd {
        "add-device" => &["path", "id"],
        "remove-device" => &["id", "timeout_secs"],
        "dma-test" => &["id", "force"],
        "list-devices" | "info" | "ping" => &[],
        _ => return None,
    };
    if obj
        .keys()
        .any(|k| k != "command" && !allowed.contains(&k.as_str()))
    {
        return None;
    }
    let string = |k: &str| obj.get(k).and_then(Value::as_str).map(String::from);
    Some(match cmd {
        "add-device" => Request::AddDevice {
            path: string("path")?,
            id: match obj.get("id") {
                None | Some(Value::Null) => None,
                Some(x) => Some(x.as_str()?.to_string()),
            },
        },
        "remove-device" => Request::RemoveDevice {
            id: string("id")?,
            timeout_secs: match obj.get("timeout_secs") {
                None | Some(Value::Null) => None,
                Some(x) => Some(x.as_u64().filter(|&t| t <= MAX_TIMEOUT_SECS)?),
            },
        },
        "dma-test" => Request::DmaTest {
            id: string("id")?,
            force: match obj.get("force") {
                None => false,
                Some(x) => x.as_bool()?,
            },
        },
        "list-devices" => Request::ListDevices,
        "info" => Request::Info,
        _ => Request::Ping,
    })
}

/// What the parser should do with a line.
fn expected(line: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(line).ok()?;
    model(&serde_json::from_str::<Value>(text.trim()).ok()?)
}

/// A backend that records what it was asked and answers with it.
#[derive(Default)]
struct Recorder(Vec<Request>);

impl Backend for Recorder {
    fn handle(&mut self, req: Request) -> Reply {
        self.0.push(req.clone());
        match req {
            Request::Ping => Reply::ok(json!("pong")),
            Request::RemoveDevice { id, .. } => Reply::err(format!("no device with id '{id}'")),
            other => Reply::ok(serde_json::to_value(other).unwrap_or_default()),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn the_parser_accepts_exactly_what_the_protocol_allows(line in line()) {
        let got = parse_request(&line);
        let want = expected(&line);
        prop_assert_eq!(
            got.as_ref().ok(),
            want.as_ref(),
            "{} -> {:?}",
            String::from_utf8_lossy(&line),
            got
        );
        match got {
            Ok(req) => {
                let again = serde_json::to_string(&req).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(parse_request(again.as_bytes()), Ok(req), "{}", again);
            }
            Err(e) => prop_assert!(e.len() > 10, "the error says what is wrong: {:?}", e),
        }
    }

    #[test]
    fn the_server_answers_every_line_once_and_serves_only_what_parses(
        lines in prop::collection::vec(
            prop_oneof![8 => line(), 1 => Just(Vec::new()), 1 => Just(b" \t\r".to_vec())],
            1..12,
        )
    ) {
        let (client, server) = UnixStream::pair().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let worker = std::thread::spawn(move || {
            let mut b = Recorder::default();
            serve_connection(server, &mut b);
            b
        });
        let mut w = client.try_clone().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for l in lines.iter().chain([&b"{\"command\":\"ping\"}".to_vec()]) {
            w.write_all(l).and_then(|()| w.write_all(b"\n"))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        client.shutdown(std::net::Shutdown::Write).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let replies: Vec<String> = BufReader::new(client).lines().map_while(Result::ok).collect();
        let backend = worker.join().map_err(|_| TestCaseError::fail("the server thread panicked"))?;

        let answered: Vec<&Vec<u8>> = lines
            .iter()
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .collect();
        prop_assert_eq!(replies.len(), answered.len() + 1, "one reply per line: {:?}", replies);
        let mut served = Vec::new();
        for (l, r) in answered.iter().zip(&replies) {
            let r: Reply = serde_json::from_str(r).map_err(|e| TestCaseError::fail(format!("{r}: {e}")))?;
            prop_assert_eq!(r.ok, r.result.is_some());
            prop_assert_eq!(r.ok, r.error.is_none());
            match expected(l) {
                Some(req) => {
                    let refused = matches!(req, Request::RemoveDevice { .. });
                    prop_assert_eq!(r.ok, !refused, "{}", String::from_utf8_lossy(l));
                    served.push(req);
                }
                None => prop_assert!(!r.ok, "{} was accepted", String::from_utf8_lossy(l)),
            }
        }
        served.push(Request::Ping);
        prop_assert_eq!(backend.0, served, "the backend saw exactly the requests that parse");
        prop_assert_eq!(replies.last().map(String::as_str), Some(r#"{"ok":true,"result":"pong"}"#));
    }
}
