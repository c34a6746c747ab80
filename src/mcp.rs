//! `ai-cmd-executor mcp`: a Model Context Protocol server over stdio, for
//! AI agents. It is only a client of the spool contract: it submits job
//! files and reads results and logs, as the agent's user; the worker runs
//! every job. Jobs outlive this process: a new session finds them again
//! with `list_jobs` and `get_job`.
//!
//! Every failure is a tool error with a message for the model (a bad id,
//! an unknown job, no worker on the spool, a full disk), never a crash of
//! the server.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ErrorData, ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{Client, ClientError, JobState, Submission};
use crate::spool::job::{OnInterrupt, SubmittedVia};
use crate::spool::{JobId, JobResult};

/// `wait_secs` of `run_command` when the call gives none.
pub const DEFAULT_WAIT_SECS: u64 = 30;
/// The longest `run_command` waits for a job, whatever it asks.
pub const MAX_WAIT_SECS: u64 = 300;
/// The most of a log's end `run_command` and `get_job` return.
pub const TAIL_BYTES: usize = 16 * 1024;
/// `max_bytes` of `read_log` when the call gives none.
pub const DEFAULT_READ_BYTES: usize = 64 * 1024;
/// The most `read_log` returns in one call.
pub const MAX_READ_BYTES: usize = 1024 * 1024;
/// `limit` of `list_jobs` when the call gives none, and its largest value.
const DEFAULT_LIST: usize = 20;
const MAX_LIST: usize = 500;

/// `run_command`'s arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommand {
    /// The shell command, run with `bash -c` by the worker.
    pub command: String,
    /// Absolute directory to run it in (default: the worker's).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Seconds before the worker kills it (default: the worker's default
    /// timeout, usually one hour). Give long-running servers a long one.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Seconds to wait for the result before returning the job id and its
    /// output so far (default 30, at most 300; 0 returns at once).
    #[serde(default)]
    pub wait_secs: Option<u64>,
}

/// `get_job`'s arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetJob {
    /// The job id that `run_command` or `list_jobs` returned.
    pub id: String,
}

/// `read_log`'s arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadLog {
    /// The job id.
    pub id: String,
    /// The byte to start at: 0, or the `next_offset` of the previous call.
    #[serde(default)]
    pub offset: Option<u64>,
    /// The most bytes to return (default 65536, at most 1048576).
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

/// `cancel_job`'s arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    /// The job id.
    pub id: String,
}

/// How long `cancel_job` waits for the job to end after asking.
const CANCEL_WAIT: Duration = Duration::from_secs(15);

/// `list_jobs`'s arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListJobs {
    /// Only jobs in this state: `pending`, `running` or `completed`.
    #[serde(default)]
    pub state: Option<String>,
    /// The most jobs to return, newest first (default 20, at most 500).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// The server: the tools over one spool.
#[derive(Clone)]
pub struct Server {
    client: Arc<Client>,
    tool_router: ToolRouter<Server>,
}

/// A tool error: a message for the model.
fn refusal(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

impl Server {
    /// A server for the spool of `client`.
    pub fn new(client: Client) -> Self {
        Server {
            client: Arc::new(client),
            tool_router: Self::tool_router(),
        }
    }

    fn id(&self, id: &str) -> Result<JobId, CallToolResult> {
        id.parse::<JobId>().map_err(|e| {
            refusal(format!(
                "{id:?} is not a job id: {e}. Use an id that run_command or list_jobs returned."
            ))
        })
    }

    /// Why no job can run now, if no worker serves the spool.
    fn unserved(&self) -> Option<String> {
        let root = self.client.spool().root();
        match crate::install::ensure::serving_worker(root) {
            Ok(Some(_)) => None,
            Ok(None) => Some(format!(
                "no worker is running on the spool {root}, so no job can run. Ask the operator to start one: `sudo systemctl start ai-cmd-executor` where it is installed as a service, or `ai-cmd-executor run --spool {root}` in a terminal.",
                root = root.display()
            )),
            Err(e) => Some(format!(
                "cannot tell whether a worker serves {}: {e:#}",
                root.display()
            )),
        }
    }

    /// The end of the latest log of `id`: at most [`TAIL_BYTES`], as text,
    /// with whether bytes before it were left out, and the log's length.
    fn tail(&self, id: &JobId) -> (String, bool, u64) {
        let Ok(Some(path)) = self.client.latest_log(id) else {
            return (String::new(), false, 0);
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return (String::new(), false, 0);
        };
        let len = bytes.len() as u64;
        let cut = bytes.len().saturating_sub(TAIL_BYTES);
        // Start on a character boundary: skip continuation bytes.
        let start = (cut..bytes.len())
            .find(|&i| bytes[i] & 0xC0 != 0x80)
            .unwrap_or(bytes.len());
        let text = String::from_utf8_lossy(&bytes[if cut == 0 { 0 } else { start }..]);
        (text.into_owned(), cut > 0, len)
    }

    /// A job's state, result and output tail, as tools return it.
    fn job_view(&self, id: &JobId) -> Result<Value, CallToolResult> {
        let state = self.client.state(id).map_err(|e| refusal(format!("{e}")))?;
        let (output, cut, log_bytes) = self.tail(id);
        let mut v = match state {
            JobState::Unknown => {
                return Err(refusal(format!(
                    "no job {id} in the spool {} (not pending, not running, no result); list_jobs shows the jobs there are",
                    self.client.spool().root().display()
                )));
            }
            JobState::Pending => json!({"id": id.as_str(), "state": "pending"}),
            JobState::Running => json!({"id": id.as_str(), "state": "running"}),
            JobState::Finished(r) => finished(&r),
        };
        v["output"] = Value::String(output);
        v["output_tail_only"] = Value::Bool(cut);
        v["next_offset"] = json!(log_bytes);
        Ok(v)
    }
}

/// What a finished job's view carries of its result.
fn finished(r: &JobResult) -> Value {
    let mut v = json!({
        "id": r.id,
        "state": "finished",
        "status": r.status,
        "exit_code": r.exit_code,
        "signal": r.signal,
        "duration_ms": r.duration_ms,
        "error": r.error,
        "output_truncated": r.output_truncated,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
    });
    if let Ok(Value::Object(all)) = serde_json::to_value(r) {
        for key in [
            "cpu_user_ms",
            "cpu_system_ms",
            "max_rss_bytes",
            "memory_peak_bytes",
            "limits",
            "submitted_by",
            "submitted_via",
            "cancelled_by",
        ] {
            if let Some(x) = all.get(key) {
                v[key] = x.clone();
            }
        }
    }
    v
}

/// The text a tool result shows next to its structured content: the
/// output first, for a model that reads only text.
fn text_of(v: &Value) -> String {
    let mut head = v.clone();
    let output = head
        .as_object_mut()
        .and_then(|o| o.remove("output"))
        .and_then(|o| o.as_str().map(str::to_owned));
    let mut text = head.to_string();
    if let Some(out) = output {
        text.push_str("\n--- output ---\n");
        text.push_str(&out);
    }
    text
}

fn structured(v: Value) -> CallToolResult {
    let mut r = CallToolResult::structured(v.clone());
    r.content = vec![ContentBlock::text(text_of(&v))];
    r
}

fn either(r: Result<CallToolResult, CallToolResult>) -> Result<CallToolResult, ErrorData> {
    Ok(r.unwrap_or_else(|e| e))
}

#[tool_router]
impl Server {
    /// Runs a shell command through the worker and waits a while for it.
    #[tool(
        description = "Run a shell command (bash -c) on this host through the ai-cmd-executor worker. The job runs under the worker's supervision, not in this process: it survives this session and keeps running if the call returns early. Waits up to wait_secs (default 30, max 300) and returns either the finished result (status, exit_code, duration_ms, the last 16 KiB of output) or the job id with state pending/running and the output so far; then follow it with read_log (from next_offset) or get_job, and stop it with cancel_job. Use a long timeout_secs for servers and builds."
    )]
    async fn run_command(
        &self,
        Parameters(a): Parameters<RunCommand>,
    ) -> Result<CallToolResult, ErrorData> {
        let this = self.clone();
        either(
            tokio::task::spawn_blocking(move || this.run_blocking(a))
                .await
                .unwrap_or_else(|e| Err(refusal(format!("internal error: {e}")))),
        )
    }

    /// A job's state and, once finished, its result.
    #[tool(
        description = "Get a job's state (pending, running, finished) and, once finished, its result: status (succeeded, failed, timed_out, interrupted, rejected, expired), exit_code, signal, duration_ms, error, resource usage, and the last 16 KiB of its output."
    )]
    async fn get_job(
        &self,
        Parameters(a): Parameters<GetJob>,
    ) -> Result<CallToolResult, ErrorData> {
        either(
            self.id(&a.id)
                .and_then(|id| self.job_view(&id))
                .map(structured),
        )
    }

    /// Output from a byte offset, while the job runs or after.
    #[tool(
        description = "Read a job's output (stdout and stderr, interleaved) from a byte offset, while it runs or after it finished. Returns text (invalid UTF-8 replaced), next_offset (pass it as offset next time: no byte is returned twice) and finished (true once the job had ended: the output is complete). Poll with a pause while finished is false to follow a long job."
    )]
    async fn read_log(
        &self,
        Parameters(a): Parameters<ReadLog>,
    ) -> Result<CallToolResult, ErrorData> {
        let r = self.id(&a.id).and_then(|id| {
            let max = a
                .max_bytes
                .unwrap_or(DEFAULT_READ_BYTES)
                .clamp(1, MAX_READ_BYTES);
            let chunk = self
                .client
                .read_log(&id, a.offset.unwrap_or(0), max)
                .map_err(|e| match e {
                    ClientError::Unknown(_) => {
                        refusal(format!("{e}; list_jobs shows the jobs there are"))
                    }
                    e => refusal(format!("{e}")),
                })?;
            Ok(structured(json!({
                "id": id.as_str(),
                "output": String::from_utf8_lossy(&chunk.bytes),
                "next_offset": chunk.next_offset,
                "finished": chunk.finished,
            })))
        });
        either(r)
    }

    /// Withdraws a pending job or stops a running one.
    #[tool(
        description = "Cancel a job: withdraw it if it is still pending, or stop it if it runs (SIGTERM, then SIGKILL after the worker's kill grace, with every process it started). Only the job's submitter (this agent's user) or root may cancel it. Waits up to 15 s for the job to end and returns its state; a finished job cannot be cancelled."
    )]
    async fn cancel_job(
        &self,
        Parameters(a): Parameters<CancelJob>,
    ) -> Result<CallToolResult, ErrorData> {
        let this = self.clone();
        either(
            tokio::task::spawn_blocking(move || {
                let id = this.id(&a.id)?;
                this.client.cancel(&id).map_err(|e| match e {
                    ClientError::Unknown(_) => {
                        refusal(format!("{e}; list_jobs shows the jobs there are"))
                    }
                    e => refusal(format!("{e}")),
                })?;
                match this.client.wait(&id, Some(CANCEL_WAIT)) {
                    Ok(_) | Err(ClientError::Timeout { .. }) => {}
                    Err(e) => {
                        return Err(refusal(format!("the cancel of {id} was asked, but: {e}")));
                    }
                }
                this.job_view(&id).map(structured)
            })
            .await
            .unwrap_or_else(|e| Err(refusal(format!("internal error: {e}")))),
        )
    }

    /// Jobs in the spool, newest first.
    #[tool(
        description = "List jobs in the spool, newest first: id, state (pending, running, completed), since, and for completed jobs status and exit_code. Use it to find jobs again after a restart."
    )]
    async fn list_jobs(
        &self,
        Parameters(a): Parameters<ListJobs>,
    ) -> Result<CallToolResult, ErrorData> {
        let r = (|| {
            if let Some(s) = a.state.as_deref()
                && !["pending", "running", "completed"].contains(&s)
            {
                return Err(refusal(format!(
                    "state must be pending, running or completed, not {s:?}"
                )));
            }
            let mut jobs = self
                .client
                .list(a.state.as_deref())
                .map_err(|e| refusal(format!("{e}")))?;
            jobs.sort_by_key(|j| std::cmp::Reverse(j.since));
            jobs.truncate(a.limit.unwrap_or(DEFAULT_LIST).clamp(1, MAX_LIST));
            let jobs: Vec<Value> = jobs
                .iter()
                .map(|j| {
                    let mut v = json!({"id": j.id, "state": j.state, "since": j.since});
                    if let Some(r) = &j.result {
                        v["status"] = json!(r.status);
                        v["exit_code"] = json!(r.exit_code);
                    }
                    v
                })
                .collect();
            Ok(structured(json!({ "jobs": jobs })))
        })();
        either(r)
    }
}

impl Server {
    fn run_blocking(&self, a: RunCommand) -> Result<CallToolResult, CallToolResult> {
        if let Some(why) = self.unserved() {
            return Err(refusal(format!("{why} The command was not submitted.")));
        }
        let mut sub = Submission::command(a.command)
            .with_options(a.env.unwrap_or_default(), a.cwd, OnInterrupt::Fail)
            .via(SubmittedVia::Mcp);
        if let Some(t) = a.timeout_secs {
            let t = NonZeroU64::new(t).ok_or_else(|| refusal("timeout_secs must be at least 1"))?;
            sub = sub.with_timeout(t);
        }
        let id = self
            .client
            .submit(&sub)
            .map_err(|e| refusal(format!("the command was not submitted: {e}")))?;
        let wait = Duration::from_secs(a.wait_secs.unwrap_or(DEFAULT_WAIT_SECS).min(MAX_WAIT_SECS));
        match self.client.wait(&id, Some(wait)) {
            Ok(_) | Err(ClientError::Timeout { .. }) => {}
            Err(e) => return Err(refusal(format!("job {id} was submitted, but: {e}"))),
        }
        self.job_view(&id).map(structured)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("ai-cmd-executor", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "Runs shell commands on this host through the ai-cmd-executor worker serving the spool {}. Jobs are durable: they run under the worker, survive this session, and keep their results and output. run_command starts one and waits a while; get_job and read_log follow it; cancel_job stops it; list_jobs finds jobs again.",
                self.client.spool().root().display()
            ))
    }
}

/// Serves MCP on stdin and stdout until the client closes the connection.
pub async fn serve(client: Client) -> anyhow::Result<()> {
    let service = Server::new(client)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("starting the MCP session: {e}"))?;
    service
        .waiting()
        .await
        .map_err(|e| anyhow::anyhow!("the MCP session ended: {e}"))?;
    Ok(())
}
