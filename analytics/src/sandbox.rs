//! SQL analyses run in a child process (`scholia compute`) with a memory budget, so that
//! SQL written by an admin cannot take the service down: a query that would need more
//! memory than `SCHOLIA_BUILD_MEMORY_MB` (a partition cross-joined with itself a few
//! times, say) is stopped, its build fails with an error that names the limit, and every
//! other partition keeps flowing. The worker's build time limit applies too: dropping the
//! build kills the child.
//!
//! The parent sends the SQL, the table names and the input frames (Arrow IPC streams) on
//! the child's stdin and reads the result the same way from its stdout, while it watches
//! the child's resident memory. A child serves one computation after another: an idle one
//! waits in a small pool, so a build does not pay for starting a process; one that grew
//! past half the budget, or failed, is not kept. Built-in analyses are Scholia's own code
//! and run in the worker itself.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polars::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use scholia_events::analysis::InputSource;

use crate::analysis::Inputs;
use crate::sql::run_sql;

/// The subcommand of the `scholia` binary that serves computations.
pub const SUBCOMMAND: &str = "compute";
/// How often the child's memory is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(20);
/// The most idle children kept for the next builds.
const MAX_IDLE: usize = 4;
/// The last bytes of a child's stderr kept, for the error when it stops without an answer.
const STDERR_KEPT: usize = 16 * 1024;

/// Why a sandboxed computation did not produce a frame.
#[derive(Debug)]
pub enum Failure {
    /// The analysis itself failed (its SQL, its data): deterministic.
    Analysis(String),
    /// It needed more memory than the budget.
    Memory { limit_mb: u64 },
    /// The child could not be run or answered nonsense: worth retrying.
    Sandbox(String),
}

#[derive(Serialize, Deserialize)]
struct Request {
    sql: String,
    /// Table name → index of its frame.
    tables: Vec<(String, usize)>,
    frames: usize,
}

/// A running `scholia compute`. Dropping it kills the process.
struct Sandbox {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// The tail of what it wrote to stderr.
    stderr: Arc<Mutex<Vec<u8>>>,
}

/// Idle children, ready for the next computation.
static IDLE: Mutex<Vec<Sandbox>> = Mutex::new(Vec::new());

impl Sandbox {
    fn start() -> Result<Sandbox, Failure> {
        let exe = std::env::current_exe()
            .map_err(|e| Failure::Sandbox(format!("cannot find the scholia binary: {e}")))?;
        let mut child = Command::new(exe)
            .arg(SUBCOMMAND)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::Sandbox(format!("cannot start the computation: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let tail = stderr.clone();
        // Drained for as long as the child lives (the task ends with it), so that the child
        // never blocks writing to stderr.
        tokio::spawn(async move {
            let mut buffer = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buffer).await {
                let mut kept = tail.lock().expect("stderr lock");
                kept.extend_from_slice(&buffer[..n]);
                let excess = kept.len().saturating_sub(STDERR_KEPT);
                kept.drain(..excess);
            }
        });
        Ok(Sandbox {
            child,
            stdin,
            stdout,
            stderr,
        })
    }

    fn resident_bytes(&self) -> Option<u64> {
        resident_bytes(self.child.id()?)
    }

    /// Send one request and read its answer: the tag byte and its body.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u8, Vec<u8>)> {
        let write = async {
            self.stdin
                .write_all(&(request.len() as u64).to_le_bytes())
                .await?;
            self.stdin.write_all(request).await?;
            self.stdin.flush().await
        };
        let read = async {
            let mut head = [0u8; 9];
            self.stdout.read_exact(&mut head).await?;
            let length = u64::from_le_bytes(head[1..].try_into().expect("8 bytes")) as usize;
            let mut body = vec![0u8; length];
            self.stdout.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>((head[0], body))
        };
        let (written, read) = tokio::join!(write, read);
        let answer = read?;
        written?;
        Ok(answer)
    }

    /// Why the child stopped without answering.
    async fn stopped(mut self) -> Failure {
        let status = match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            _ => "still running".to_string(),
        };
        let stderr =
            String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned();
        Failure::Sandbox(format!(
            "the computation stopped ({status}) without an answer{}",
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.trim())
            }
        ))
    }
}

/// Run `sql` over `inputs` in a child process holding at most `memory_mb` resident.
pub async fn run(
    sql: &str,
    tables: &[(String, InputSource)],
    inputs: Inputs,
    memory_mb: u64,
) -> Result<DataFrame, Failure> {
    let sql = sql.to_string();
    let tables = tables.to_vec();
    let request = tokio::task::spawn_blocking(move || encode_request(&sql, &tables, inputs))
        .await
        .map_err(|e| Failure::Sandbox(e.to_string()))?
        .map_err(|e| Failure::Sandbox(format!("encoding the inputs: {e}")))?;
    let limit = memory_mb * 1024 * 1024;
    let pooled = IDLE.lock().expect("sandbox pool").pop();
    let (mut sandbox, mut reused) = match pooled {
        Some(sandbox) => (sandbox, true),
        None => (Sandbox::start()?, false),
    };
    let answer = loop {
        sandbox.stderr.lock().expect("stderr lock").clear();
        let pid = sandbox.child.id();
        let watch = async {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                if pid.and_then(resident_bytes).is_some_and(|rss| rss > limit) {
                    return;
                }
            }
        };
        let outcome = tokio::select! {
            answer = sandbox.exchange(&request) => answer,
            _ = watch => {
                // Dropping the sandbox kills it.
                return Err(Failure::Memory { limit_mb: memory_mb });
            }
        };
        match outcome {
            Ok(answer) => break answer,
            // A pooled child that died while idle, or whose pipes belong to a runtime that
            // is gone: once more, with a new one.
            Err(_) if reused => {
                reused = false;
                sandbox = Sandbox::start()?;
                continue;
            }
            Err(_) => return Err(sandbox.stopped().await),
        }
    };
    // Kept for the next build unless it grew (memory a query left behind stays with the
    // process), or the pool is full; dropped, it is killed.
    if sandbox.resident_bytes().is_some_and(|rss| rss <= limit / 2) {
        let mut idle = IDLE.lock().expect("sandbox pool");
        if idle.len() < MAX_IDLE {
            idle.push(sandbox);
        }
    }
    match answer {
        (0, frame) => tokio::task::spawn_blocking(move || {
            IpcStreamReader::new(std::io::Cursor::new(frame)).finish()
        })
        .await
        .map_err(|e| Failure::Sandbox(e.to_string()))?
        .map_err(|e| Failure::Sandbox(format!("decoding the result: {e}"))),
        (1, message) => Err(Failure::Analysis(
            String::from_utf8_lossy(&message).into_owned(),
        )),
        (tag, _) => Err(Failure::Sandbox(format!(
            "the computation answered with the unknown tag {tag}"
        ))),
    }
}

/// Resident memory of a process, from `/proc`.
fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn encode_request(
    sql: &str,
    tables: &[(String, InputSource)],
    inputs: Inputs,
) -> PolarsResult<Vec<u8>> {
    let frames = inputs.into_frames();
    let sources: Vec<&InputSource> = frames.keys().collect();
    let request = Request {
        sql: sql.to_string(),
        tables: tables
            .iter()
            .filter_map(|(name, source)| {
                let index = sources.iter().position(|s| *s == source)?;
                Some((name.clone(), index))
            })
            .collect(),
        frames: frames.len(),
    };
    let header = serde_json::to_vec(&request).expect("a request serializes");
    let mut out = Vec::new();
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for mut frame in frames.into_values() {
        let mut bytes = Vec::new();
        IpcStreamWriter::new(&mut bytes).finish(&mut frame)?;
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// The child's side: read requests from stdin, one after another, and answer each on
/// stdout; a request is its length (8 bytes, little-endian) and its bytes, an answer a tag
/// (0: an Arrow IPC stream follows, 1: an error message), its length and its bytes.
/// Returns the exit code: 0 once stdin closes.
pub fn serve_child() -> i32 {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    loop {
        let mut length = [0u8; 8];
        match stdin.read_exact(&mut length) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return 0,
            Err(_) => return 2,
        }
        let mut input = vec![0u8; u64::from_le_bytes(length) as usize];
        if stdin.read_exact(&mut input).is_err() {
            return 2;
        }
        let (tag, body) = match compute(&input) {
            Ok(mut frame) => {
                let mut bytes = Vec::new();
                match IpcStreamWriter::new(&mut bytes).finish(&mut frame) {
                    Ok(()) => (0u8, bytes),
                    Err(e) => (1u8, e.to_string().into_bytes()),
                }
            }
            Err(message) => (1u8, message.into_bytes()),
        };
        drop(input);
        let written = stdout
            .write_all(&[tag])
            .and_then(|()| stdout.write_all(&(body.len() as u64).to_le_bytes()))
            .and_then(|()| stdout.write_all(&body))
            .and_then(|()| stdout.flush());
        if written.is_err() {
            return 2;
        }
    }
}

fn compute(input: &[u8]) -> Result<DataFrame, String> {
    let mut rest = input;
    let mut take = |what: &str| -> Result<&[u8], String> {
        let (length, tail) = rest
            .split_first_chunk::<8>()
            .ok_or_else(|| format!("the request ends before its {what}"))?;
        let length = u64::from_le_bytes(*length) as usize;
        if tail.len() < length {
            return Err(format!("the request ends inside its {what}"));
        }
        let (bytes, tail) = tail.split_at(length);
        rest = tail;
        Ok(bytes)
    };
    let request: Request = serde_json::from_slice(take("header")?)
        .map_err(|e| format!("the request header is not right: {e}"))?;
    let mut frames = Vec::with_capacity(request.frames);
    for _ in 0..request.frames {
        let bytes = take("input")?;
        frames.push(
            IpcStreamReader::new(std::io::Cursor::new(bytes))
                .finish()
                .map_err(|e| format!("an input does not decode: {e}"))?,
        );
    }
    // The SQL reads tables by name; here each name is bound to its frame by index.
    let mut inputs = Inputs::new();
    let mut tables = Vec::with_capacity(request.tables.len());
    for (name, index) in request.tables {
        let frame = frames
            .get(index)
            .ok_or_else(|| format!("table {name} names no input"))?
            .clone();
        let source = InputSource::Kind(format!("#{index}"));
        inputs.insert(source.clone(), frame);
        tables.push((name, source));
    }
    run_sql(&request.sql, &tables, &inputs).map_err(|e| e.to_string())
}
