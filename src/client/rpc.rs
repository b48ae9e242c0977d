//! JSON-RPC 2.0 for bots and scripts (issue 36): what `hush jsonrpc`
//! (standard input and output) and `hush daemon --socket PATH` (a Unix
//! socket) speak, one JSON object per line. The methods, their
//! parameters, the notifications and the error codes are documented in
//! `examples/jsonrpc.md`; this module is the protocol without the I/O:
//! [`parse`] reads a line into a [`Call`] or the error object to answer,
//! [`Rpc::call`] runs a call against an [`App`] on one connection, and
//! [`notification`] turns a history entry into what every client is told.

use serde_json::{json, Map, Value};

use super::app::{App, AppError, Entry, EntryKind, GroupRow};
use super::{ClientError, Connection};
use crate::auth::text;
use crate::mls::Suite;

/// JSON-RPC's own error codes.
pub mod code {
    /// The line is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a JSON-RPC 2.0 request object (or a line longer than
    /// [`crate::limits::MAX_RPC_LINE`]).
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// A parameter is missing or of the wrong type.
    pub const INVALID_PARAMS: i64 = -32602;
    /// A fault of this client (its state, its disk).
    pub const INTERNAL: i64 = -32603;
    /// hush's own: the operation failed for a reason the message gives.
    pub const FAILED: i64 = -32000;
    /// No group or contact by that name (or id).
    pub const NOT_FOUND: i64 = -32001;
    /// This device is not (or no longer) a member of that group.
    pub const NOT_MEMBER: i64 = -32002;
    /// The server refused; `data.server_code` is its error code (the
    /// wire's, as the CLI shows it in parentheses).
    pub const SERVER_REFUSED: i64 = -32003;
    /// The server cannot be reached (or the connection broke); retry.
    pub const UNREACHABLE: i64 = -32004;
    /// The server misbehaved or broke a group's delivery history: see
    /// `hush verify GROUP`.
    pub const MISBEHAVING: i64 = -32005;
}

/// One request read from a line.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `None`: a notification from the client (no answer is sent).
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

/// A JSON-RPC error object with the id it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), data: None }
    }

    fn params(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_PARAMS, message)
    }

    /// The response object answering `id` with this error.
    pub fn response(&self, id: Option<&Value>) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let (Some(data), Some(fields)) = (&self.data, error.as_object_mut()) {
            fields.insert("data".into(), data.clone());
        }
        json!({"jsonrpc": "2.0", "id": id.cloned().unwrap_or(Value::Null), "error": error})
    }
}

impl From<AppError> for RpcError {
    fn from(e: AppError) -> Self {
        let code = match &e {
            AppError::UnknownGroup(_)
            | AppError::UnknownContact(_)
            | AppError::UnknownInvitation(_)
            | AppError::AmbiguousGroup(_) => code::NOT_FOUND,
            AppError::NotMember(_) => code::NOT_MEMBER,
            AppError::Misbehaving(_) => code::MISBEHAVING,
            AppError::State(_) | AppError::Key(_) | AppError::Home(_) => code::INTERNAL,
            AppError::Client(ClientError::Server { code: server, .. }) => {
                return Self {
                    code: code::SERVER_REFUSED,
                    message: e.to_string(),
                    data: Some(json!({"server_code": server.to_u16()})),
                }
            }
            AppError::Client(c) if c.code().is_none() => code::UNREACHABLE,
            _ => code::FAILED,
        };
        Self::new(code, e.to_string())
    }
}

/// The success response answering `id`.
pub fn result(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// Reads one line: a request, or the error to answer (with the id, when
/// one could be read). Never panics.
pub fn parse(line: &[u8]) -> Result<Call, (Option<Value>, RpcError)> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| (None, RpcError::new(code::PARSE_ERROR, format!("not JSON: {e}"))))?;
    let Value::Object(mut fields) = value else {
        return Err((
            None,
            RpcError::new(code::INVALID_REQUEST, "a request is one JSON object (batches are not supported)"),
        ));
    };
    let id = fields.remove("id");
    if id.as_ref().is_some_and(|v| !(v.is_string() || v.is_number() || v.is_null())) {
        return Err((None, RpcError::new(code::INVALID_REQUEST, "the id must be a string, a number or null")));
    }
    if fields.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err((id, RpcError::new(code::INVALID_REQUEST, "\"jsonrpc\": \"2.0\" is missing")));
    }
    let Some(Value::String(method)) = fields.remove("method") else {
        return Err((id, RpcError::new(code::INVALID_REQUEST, "\"method\" must be a string")));
    };
    let params = match fields.remove("params") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => return Err((id, RpcError::params("parameters go by name: \"params\" must be an object"))),
    };
    Ok(Call { id, method, params })
}

/// The method names [`Rpc::call`] knows, for `examples/jsonrpc.md` and the
/// error that lists them.
pub const METHODS: &[&str] = &[
    "whoami",
    "status",
    "sync",
    "listGroups",
    "members",
    "contacts",
    "addContact",
    "invitations",
    "acceptInvitation",
    "declineInvitation",
    "createGroup",
    "addMembers",
    "removeMembers",
    "leave",
    "send",
    "sendFile",
    "read",
];

/// The methods that need no server: they answer while it is away.
pub const LOCAL_METHODS: &[&str] =
    &["whoami", "listGroups", "members", "contacts", "addContact", "invitations", "read"];

/// Entries `read` returns when the call names no `limit`.
pub const DEFAULT_READ_LIMIT: usize = 1000;

fn string<'a>(params: &'a Value, name: &str) -> Result<&'a str, RpcError> {
    match params.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(RpcError::params(format!("\"{name}\" must be a string"))),
        None => Err(RpcError::params(format!("\"{name}\" is missing"))),
    }
}

fn optional_string<'a>(params: &'a Value, name: &str) -> Result<Option<&'a str>, RpcError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::params(format!("\"{name}\" must be a string"))),
    }
}

fn strings(params: &Value, name: &str) -> Result<Vec<String>, RpcError> {
    let wrong = || RpcError::params(format!("\"{name}\" must be a non-empty list of strings"));
    let list = params.get(name).and_then(Value::as_array).ok_or_else(wrong)?;
    if list.is_empty() {
        return Err(wrong());
    }
    list.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(wrong)).collect()
}

/// A history entry as JSON (what `read` returns and notifications carry).
pub fn entry_json(app: &App, e: &Entry) -> Value {
    let mut v = json!({
        "group": e.group,
        "group_id": text::encode(&e.group_id),
        "seq": e.seq,
        "sender": e.sender,
        "time": e.time,
        "kind": e.kind.as_str(),
        "text": e.body,
    });
    if let Some(fields) = v.as_object_mut() {
        if let Some(a) = &e.sender_account {
            fields.insert("sender_account".into(), a.to_string().into());
            fields.insert("from_me".into(), (*a == app.account()).into());
        }
        if let Some(t) = e.expires {
            fields.insert("expires_at".into(), t.into());
        }
        if e.imported {
            fields.insert("imported".into(), true.into());
        }
    }
    v
}

/// The notification telling a client about `e`: `message` for what a
/// member wrote, `event` for everything else (joins, members added or
/// removed, repairs, timer changes, alarms).
pub fn notification(app: &App, e: &Entry) -> Value {
    let method = if e.kind == EntryKind::Text { "message" } else { "event" };
    json!({"jsonrpc": "2.0", "method": method, "params": entry_json(app, e)})
}

/// The notification saying that `count` notifications were dropped for a
/// client that did not read them in time.
pub fn dropped(count: u64) -> Value {
    json!({"jsonrpc": "2.0", "method": "dropped", "params": {"count": count}})
}

fn group_json(app: &mut App, g: &GroupRow) -> Value {
    json!({
        "id": text::encode(&g.id),
        "name": g.name,
        "active": g.active,
        "suite": app.suite(g),
        "members": if g.active { app.member_accounts(g).len() } else { 0 },
        "disappear": app.disappear(g),
    })
}

/// What a call gave: its result, and the history entries it produced
/// (a sync's news, a sent message), which every client is told of.
pub struct Outcome {
    pub result: Value,
    pub entries: Vec<Entry>,
}

impl Outcome {
    fn just(result: Value) -> Self {
        Self { result, entries: Vec::new() }
    }
}

/// The methods, on one app and one connection.
pub struct Rpc;

impl Rpc {
    /// Runs one call; `conn` is `None` while the server is unreachable, and
    /// only [`LOCAL_METHODS`] run then.
    pub async fn call(app: &mut App, conn: Option<&mut Connection>, call: &Call) -> Result<Outcome, RpcError> {
        let p = &call.params;
        let local = LOCAL_METHODS.contains(&call.method.as_str());
        let known = METHODS.contains(&call.method.as_str());
        let conn = match conn {
            Some(c) => c,
            None if local => return Self::local(app, call),
            None if known => {
                return Err(RpcError::new(
                    code::UNREACHABLE,
                    "not connected to the server (reconnecting in the background); retry later",
                ))
            }
            None => return Self::local(app, call),
        };
        if local {
            return Self::local(app, call);
        }
        match call.method.as_str() {
            "status" => {
                let s = conn.status().await.map_err(AppError::from)?;
                Ok(Outcome::just(json!({
                    "account": s.account.to_string(),
                    "device": s.device.to_string(),
                    "registered_at": s.registered_at,
                    "server_time": s.server_time,
                    "retention": s.retention,
                })))
            }
            "sync" => {
                let entries = app.sync(conn).await?;
                let failures: Vec<Value> =
                    app.sync_failures().iter().map(|(g, why)| json!({"group": g, "error": why})).collect();
                Ok(Outcome { result: json!({"new": entries.len(), "failed": failures}), entries })
            }
            "createGroup" => {
                let name = string(p, "name")?;
                let suite = match optional_string(p, "suite")? {
                    Some(s) => s.parse::<Suite>().map_err(RpcError::params)?,
                    None => crate::mls::DEFAULT_SUITE,
                };
                let id = app.create_group(conn, name, suite).await?;
                Ok(Outcome::just(json!({"id": text::encode(&id), "name": name, "suite": suite.to_string()})))
            }
            "addMembers" | "removeMembers" => {
                let g = app.resolve_group(string(p, "group")?)?;
                let who = strings(p, "members")?;
                let accounts = who.iter().map(|w| app.resolve_contact(w)).collect::<Result<Vec<_>, _>>()?;
                if call.method == "addMembers" {
                    app.add(conn, &g, &accounts).await?;
                } else {
                    app.remove(conn, &g, &accounts).await?;
                }
                Ok(Outcome::just(json!({"group": g.name, "accounts": accounts.len()})))
            }
            "leave" => {
                let g = app.resolve_group(string(p, "group")?)?;
                app.leave(conn, &g).await?;
                Ok(Outcome::just(json!({"group": g.name, "group_id": text::encode(&g.id)})))
            }
            "send" => {
                let g = app.resolve_group(string(p, "group")?)?;
                let body = string(p, "text")?;
                if body.is_empty() {
                    return Err(RpcError::params("\"text\" is empty"));
                }
                let seq = app.send_text(conn, &g, body).await?;
                Ok(Outcome::just(json!({"group": g.name, "group_id": text::encode(&g.id), "seq": seq})))
            }
            "sendFile" => {
                let g = app.resolve_group(string(p, "group")?)?;
                let path = std::path::PathBuf::from(string(p, "path")?);
                let name = optional_string(p, "name")?;
                let caption = optional_string(p, "caption")?.unwrap_or_default();
                let sent = app.send_file(conn, &g, &path, name, caption, &mut Quiet).await?;
                Ok(Outcome::just(json!({
                    "group": g.name,
                    "group_id": text::encode(&g.id),
                    "seq": sent.seq,
                    "id": super::app::files::file_id(&sent.id),
                    "size": sent.size,
                })))
            }
            "acceptInvitation" => {
                let entries = app.accept_invitation(conn, string(p, "group")?).await?;
                Ok(Outcome { result: json!({"joined": true}), entries })
            }
            "declineInvitation" => {
                app.decline_invitation(conn, string(p, "group")?).await?;
                Ok(Outcome::just(json!({"declined": true})))
            }
            _ => Self::local(app, call),
        }
    }

    /// The methods that need no server.
    fn local(app: &mut App, call: &Call) -> Result<Outcome, RpcError> {
        let p = &call.params;
        match call.method.as_str() {
            "whoami" => Ok(Outcome::just(json!({
                "account": app.account().to_string(),
                "device": app.certificate().device.to_string(),
            }))),
            "listGroups" => {
                let groups = app.groups()?;
                let list: Vec<Value> = groups.iter().map(|g| group_json(app, g)).collect();
                Ok(Outcome::just(Value::Array(list)))
            }
            "members" => {
                let g = app.resolve_group(string(p, "group")?)?;
                let list: Vec<Value> = app
                    .member_accounts(&g)
                    .iter()
                    .map(|a| json!({"name": app.display(a), "account": a.to_string(), "me": *a == app.account()}))
                    .collect();
                Ok(Outcome::just(Value::Array(list)))
            }
            "contacts" => {
                let list: Vec<Value> = app
                    .contacts()?
                    .into_iter()
                    .map(|(name, a)| json!({"name": name, "account": a.to_string()}))
                    .collect();
                Ok(Outcome::just(Value::Array(list)))
            }
            "addContact" => {
                let account = app.contact_add(string(p, "name")?, string(p, "account")?)?;
                Ok(Outcome::just(json!({"name": string(p, "name")?.trim(), "account": account.to_string()})))
            }
            "invitations" => {
                let list: Vec<Value> = app
                    .invitations()?
                    .iter()
                    .map(|i| {
                        json!({
                            "group": text::encode(&i.group),
                            "inviter": app.display(&i.inviter),
                            "inviter_account": i.inviter.to_string(),
                            "devices": i.members,
                        })
                    })
                    .collect();
                Ok(Outcome::just(Value::Array(list)))
            }
            "read" => {
                let g = app.resolve_group(string(p, "group")?)?;
                let limit = match p.get("limit") {
                    None | Some(Value::Null) => DEFAULT_READ_LIMIT,
                    Some(v) => v
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| RpcError::params("\"limit\" must be a non-negative integer"))?,
                };
                let history = app.history(&g)?;
                let skip = history.len().saturating_sub(limit);
                let list: Vec<Value> = history.iter().skip(skip).map(|e| entry_json(app, e)).collect();
                Ok(Outcome::just(Value::Array(list)))
            }
            other => Err(RpcError {
                code: code::METHOD_NOT_FOUND,
                message: format!("no method {other:?}"),
                data: Some(json!({"methods": METHODS})),
            }),
        }
    }
}

/// No progress to show: a bot's file goes up silently.
struct Quiet;

impl super::app::files::Progress for Quiet {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_that_are_no_request_get_the_error_json_rpc_names() {
        let cases: [(&[u8], i64); 8] = [
            (b"{", code::PARSE_ERROR),
            (b"[1,2]", code::INVALID_REQUEST),
            (b"{\"method\":\"send\"}", code::INVALID_REQUEST),
            (b"{\"jsonrpc\":\"2.0\",\"method\":7}", code::INVALID_REQUEST),
            (b"{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"sync\"}", code::INVALID_REQUEST),
            (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"send\",\"params\":[1]}", code::INVALID_PARAMS),
            (b"\xff\xfe", code::PARSE_ERROR),
            (b"", code::PARSE_ERROR),
        ];
        for (line, expected) in cases {
            let (_, e) = parse(line).unwrap_err();
            assert_eq!(e.code, expected, "{}", String::from_utf8_lossy(line));
        }
        let call = parse(br#"{"jsonrpc":"2.0","id":"a","method":"send","params":{"group":"g","text":"hi"}}"#).unwrap();
        assert_eq!(call.id, Some(json!("a")));
        assert_eq!(string(&call.params, "text").unwrap(), "hi");
        assert_eq!(string(&call.params, "group").unwrap(), "g");
        assert_eq!(string(&json!({"text": 5}), "text").unwrap_err().code, code::INVALID_PARAMS);
        assert_eq!(strings(&json!({"members": []}), "members").unwrap_err().code, code::INVALID_PARAMS);
        let notify = parse(br#"{"jsonrpc":"2.0","method":"sync"}"#).unwrap();
        assert_eq!(notify.id, None);
        let answer = RpcError::new(code::NOT_FOUND, "no group").response(Some(&json!(3)));
        assert_eq!(answer["error"]["code"], code::NOT_FOUND);
        assert_eq!(answer["id"], 3);
    }
}
