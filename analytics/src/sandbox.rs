//! SQL analyses run in a child process (`scholia compute`) with a memory budget, so that
//! SQL written by an admin cannot take the service down: a query that would need more
//! memory than `SCHOLIA_BUILD_MEMORY_MB` (a partition cross-joined with itself a few
//! times, say) is stopped, its build fails with an error that names the limit, and every
//! other partition keeps flowing. The worker's build time limit applies too: dropping the
//! build kills the child.
//!
//! The parent sends the SQL, the table names and the input frames (Arrow IPC streams) on
//! the child's stdin and reads the result the same way from its stdout, while it watches
//! the child's resident memory. Built-in analyses are Scholia's own code and run in the
//! worker itself.

use std::io::{Read, Write};
use std::time::Duration;

use polars::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use scholia_events::analysis::InputSource;

use crate::analysis::Inputs;
use crate::sql::run_sql;

/// The subcommand of the `scholia` binary that serves one computation.
pub const SUBCOMMAND: &str = "compute";
/// How often the child's memory is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(20);

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
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let exchange = async {
        let write = async {
            let written = stdin.write_all(&request).await;
            drop(stdin);
            written
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut stderr = (&mut stderr).take(64 * 1024);
        let (written, read, _) = tokio::join!(
            write,
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err)
        );
        (written, read, out, err)
    };
    let limit = memory_mb * 1024 * 1024;
    let watch = async {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            if let Some(pid) = pid
                && resident_bytes(pid).is_some_and(|rss| rss > limit)
            {
                return;
            }
        }
    };
    let (written, read, out, err) = tokio::select! {
        done = exchange => done,
        _ = watch => {
            let _ = child.kill().await;
            return Err(Failure::Memory { limit_mb: memory_mb });
        }
    };
    let status = child
        .wait()
        .await
        .map_err(|e| Failure::Sandbox(e.to_string()))?;
    if let (Err(e), true) = (written, out.is_empty()) {
        return Err(Failure::Sandbox(format!("sending the inputs: {e}")));
    }
    read.map_err(|e| Failure::Sandbox(format!("reading the result: {e}")))?;
    match out.split_first() {
        Some((0, frame)) => {
            let frame = frame.to_vec();
            tokio::task::spawn_blocking(move || {
                IpcStreamReader::new(std::io::Cursor::new(frame)).finish()
            })
            .await
            .map_err(|e| Failure::Sandbox(e.to_string()))?
            .map_err(|e| Failure::Sandbox(format!("decoding the result: {e}")))
        }
        Some((1, message)) => Err(Failure::Analysis(
            String::from_utf8_lossy(message).into_owned(),
        )),
        _ => {
            let stderr = String::from_utf8_lossy(&err);
            Err(Failure::Sandbox(format!(
                "the computation stopped ({status}) without an answer{}",
                if stderr.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", stderr.trim())
                }
            )))
        }
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

/// The child's side: read one request from stdin, answer on stdout. Returns the exit code.
pub fn serve_child() -> i32 {
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() {
        return 2;
    }
    let answer = match compute(&input) {
        Ok(mut frame) => {
            let mut bytes = vec![0u8];
            match IpcStreamWriter::new(&mut bytes).finish(&mut frame) {
                Ok(()) => bytes,
                Err(e) => [vec![1u8], e.to_string().into_bytes()].concat(),
            }
        }
        Err(message) => [vec![1u8], message.into_bytes()].concat(),
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(&answer)
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return 2;
    }
    0
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
