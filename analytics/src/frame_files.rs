//! Kinds' frames on local disk, so that a restarted worker rebuilds unchanged partitions
//! from files rather than from the database.
//!
//! One file per span, in a folder named by the database's installation id (so a file is
//! never read against another database): a header line of JSON (the span, the kind's
//! schema and the summary the frame was built at), then the frame as an Arrow IPC file,
//! but for its `kind` column (the header's kind in every row, put back on reading). A
//! file is only ever used after its summary has been compared with the span's summary in
//! the database, exactly like a frame kept in memory: equal means the same records, a
//! lower one means the frame is extended with what arrived since. Writes go to a temporary
//! name and are renamed into place, so a reader sees a whole file or none; a file that
//! does not read back (one of an earlier format too) is deleted. The folder is held under
//! a size bound by deleting the least recently used files.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use scholia_events::schema::KindSchema;
use scholia_events::store::Summary;

use crate::frame::PartitionInput;

/// 2: without the `kind` column (every row holds the header's kind).
const FORMAT: u32 = 2;
const SUFFIX: &str = ".frame";
/// Where `kind` stands among a frame's columns (`ENVELOPE_COLUMNS`; the round trip is
/// tested below).
const KIND_COLUMN: usize = 2;

#[derive(Serialize, Deserialize, PartialEq)]
struct Header {
    format: u32,
    kind: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    rows: i64,
    max_seq: i64,
    schema: KindSchema,
}

/// A span's frame as read back from disk, with the schema it was built with.
pub(crate) struct FileFrame {
    pub schema: KindSchema,
    pub input: PartitionInput,
}

struct Index {
    /// File name → (size in bytes, last use).
    files: HashMap<String, (u64, u64)>,
    total: u64,
    clock: u64,
}

/// The frame files of one worker process.
pub struct FrameFiles {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
}

impl FrameFiles {
    /// The files under `root` for the database `installation`, held to about `max_bytes`.
    /// Files left by an earlier process are kept (that is the point); unfinished writes are
    /// removed.
    pub fn open(root: &Path, installation: Uuid, max_bytes: u64) -> std::io::Result<FrameFiles> {
        let dir = root.join(installation.to_string());
        fs::create_dir_all(&dir)?;
        let mut found: Vec<(String, u64, std::time::SystemTime)> = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            let meta = entry.metadata()?;
            if !name.ends_with(SUFFIX) {
                // An interrupted write.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            found.push((name, meta.len(), used));
        }
        found.sort_by_key(|f| f.2);
        let mut index = Index {
            files: HashMap::new(),
            total: 0,
            clock: 0,
        };
        for (name, size, _) in found {
            index.clock += 1;
            index.total += size;
            index.files.insert(name, (size, index.clock));
        }
        let files = FrameFiles {
            dir,
            max_bytes,
            index: Mutex::new(index),
        };
        files.evict();
        Ok(files)
    }

    /// The bytes the files take now.
    pub fn bytes(&self) -> u64 {
        self.index.lock().expect("index lock").total
    }

    fn name(kind: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
        // Kind names are validated at ingest, but hex keeps any of them a safe file name.
        let kind: String = kind.bytes().map(|b| format!("{b:02x}")).collect();
        format!(
            "{kind}-{}-{}{SUFFIX}",
            from.timestamp_micros(),
            to.timestamp_micros()
        )
    }

    /// The frame of the span, when a whole, readable file of it is here. Blocking.
    pub(crate) fn read(
        &self,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Option<FileFrame> {
        let name = Self::name(kind, from, to);
        {
            let mut index = self.index.lock().expect("index lock");
            index.clock += 1;
            let clock = index.clock;
            match index.files.get_mut(&name) {
                Some(entry) => entry.1 = clock,
                None => return None,
            }
        }
        let path = self.dir.join(&name);
        match read_file(&path, kind, from, to) {
            Ok(frame) => Some(frame),
            Err(error) => {
                tracing::warn!(file = %path.display(), "A frame file did not read back ({error}); deleting it");
                self.forget(&name);
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Keep the frame of the span. Blocking; failures are logged (the file is only a
    /// cache) and leave no partial file.
    pub(crate) fn write(
        &self,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        schema: &KindSchema,
        input: &PartitionInput,
    ) {
        if self.max_bytes == 0 {
            return;
        }
        let name = Self::name(kind, from, to);
        let path = self.dir.join(&name);
        let temporary = self
            .dir
            .join(format!("{name}.{}.tmp", Uuid::new_v4().simple()));
        let header = Header {
            format: FORMAT,
            kind: kind.to_string(),
            from,
            to,
            rows: input.summary.rows,
            max_seq: input.summary.max_seq,
            schema: schema.clone(),
        };
        let written = write_file(&temporary, &header, &input.frame)
            .and_then(|size| fs::rename(&temporary, &path).map(|()| size));
        match written {
            Ok(size) => {
                {
                    let mut index = self.index.lock().expect("index lock");
                    index.clock += 1;
                    let clock = index.clock;
                    if let Some((old, _)) = index.files.insert(name, (size, clock)) {
                        index.total -= old;
                    }
                    index.total += size;
                }
                self.evict();
            }
            Err(error) => {
                let _ = fs::remove_file(&temporary);
                tracing::warn!(file = %path.display(), "Could not keep a frame on disk: {error}");
            }
        }
    }

    fn forget(&self, name: &str) {
        let mut index = self.index.lock().expect("index lock");
        if let Some((size, _)) = index.files.remove(name) {
            index.total -= size;
        }
    }

    /// Delete the least recently used files until the rest fit the bound.
    fn evict(&self) {
        let victims: Vec<String> = {
            let mut index = self.index.lock().expect("index lock");
            let mut by_age: Vec<(u64, String, u64)> = index
                .files
                .iter()
                .map(|(name, (size, used))| (*used, name.clone(), *size))
                .collect();
            by_age.sort();
            let mut victims = Vec::new();
            for (_, name, size) in by_age {
                if index.total <= self.max_bytes {
                    break;
                }
                index.files.remove(&name);
                index.total -= size;
                victims.push(name);
            }
            victims
        };
        for name in victims {
            let _ = fs::remove_file(self.dir.join(name));
        }
    }
}

fn write_file(path: &Path, header: &Header, frame: &DataFrame) -> std::io::Result<u64> {
    let mut out = std::io::BufWriter::new(fs::File::create(path)?);
    serde_json::to_writer(&mut out, header)?;
    out.write_all(b"\n")?;
    // Every row's `kind` is the header's: the file leaves the column out (a sixth of a
    // day's file, and of the reading back), and a read puts it back.
    let mut frame = frame.drop("kind").map_err(std::io::Error::other)?;
    IpcWriter::new(&mut out)
        .finish(&mut frame)
        .map_err(std::io::Error::other)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    Ok(file.metadata()?.len())
}

fn read_file(
    path: &Path,
    kind: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> std::io::Result<FileFrame> {
    let file = fs::File::open(path)?;
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    let header: Header = serde_json::from_slice(&line)?;
    if header.format != FORMAT || header.kind != kind || header.from != from || header.to != to {
        return Err(std::io::Error::other(
            "its header names another format or span",
        ));
    }
    // The IPC file is read in place, after the header: its buffers go from the page
    // cache straight into the frame's arrays. Read whole into memory first, a day's file
    // was copied twice, and zeroing the fresh pages of that copy was a fifth of a rewind
    // after a restart.
    let start = line.len() as u64;
    let mut file = reader.into_inner();
    file.seek(SeekFrom::Start(start))?;
    let mut frame = IpcReader::new(After { file, start })
        .finish()
        .map_err(std::io::Error::other)?;
    let kind_column = Column::new_scalar(
        "kind".into(),
        Scalar::new(DataType::String, AnyValue::StringOwned(kind.into())),
        frame.height(),
    );
    frame
        .insert_column(KIND_COLUMN, kind_column)
        .map_err(std::io::Error::other)?;
    if frame.height() as i64 != header.rows {
        return Err(std::io::Error::other(
            "it holds another number of rows than its header says",
        ));
    }
    Ok(FileFrame {
        schema: header.schema,
        input: PartitionInput {
            frame,
            summary: Summary {
                rows: header.rows,
                max_seq: header.max_seq,
            },
        },
    })
}

/// A file seen from `start` on: the IPC reader's offsets (its footer's, its seeks from
/// the end) are the IPC file's own, which begins after the header line.
struct After {
    file: fs::File,
    start: u64,
}

impl Read for After {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for After {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let at = match to {
            SeekFrom::Start(n) => self.file.seek(SeekFrom::Start(self.start + n))?,
            other => self.file.seek(other)?,
        };
        at.checked_sub(self.start)
            .ok_or_else(|| std::io::Error::other("a seek before the IPC file's start"))
    }
}

// Neither a whole file nor bytes in memory: the reader reads it through `Read` and `Seek`.
impl polars::io::mmap::MmapBytesReader for After {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameBuilder;
    use scholia_events::store::{RecordRow, RecordSink};

    fn frame(rows: usize) -> PartitionInput {
        let mut b = FrameBuilder::new("generation", &KindSchema::default());
        for i in 0..rows {
            b.push(RecordRow {
                data_id: Uuid::now_v7(),
                source: "plant",
                created: i as i64,
                received_at: 0,
                data: r#"{"mw": 2.5}"#,
            });
        }
        b.finish(Summary {
            rows: rows as i64,
            max_seq: 7,
        })
        .unwrap()
    }

    /// A folder of its own, removed afterwards.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            let dir = std::env::temp_dir().join(format!("scholia-frames-{}", Uuid::new_v4()));
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn span() -> (DateTime<Utc>, DateTime<Utc>) {
        let from = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        (from, from + chrono::Duration::days(1))
    }

    #[test]
    fn a_frame_reads_back_as_written_and_survives_reopening() {
        let dir = Scratch::new();
        let id = Uuid::new_v4();
        let (from, to) = span();
        let input = frame(100);
        let files = FrameFiles::open(dir.path(), id, 1 << 30).unwrap();
        files.write("generation", from, to, &KindSchema::default(), &input);
        drop(files);
        let files = FrameFiles::open(dir.path(), id, 1 << 30).unwrap();
        let back = files.read("generation", from, to).unwrap();
        assert_eq!(back.input.summary, input.summary);
        assert!(back.input.frame.equals_missing(&input.frame));
        // Another database's folder holds nothing of it.
        let other = FrameFiles::open(dir.path(), Uuid::new_v4(), 1 << 30).unwrap();
        assert!(other.read("generation", from, to).is_none());
    }

    #[test]
    fn a_damaged_file_is_deleted_not_used() {
        let dir = Scratch::new();
        let id = Uuid::new_v4();
        let (from, to) = span();
        let files = FrameFiles::open(dir.path(), id, 1 << 30).unwrap();
        files.write("generation", from, to, &KindSchema::default(), &frame(50));
        let path = dir
            .path()
            .join(id.to_string())
            .join(FrameFiles::name("generation", from, to));
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(files.read("generation", from, to).is_none());
        assert!(!path.exists());
    }

    #[test]
    fn the_least_recently_used_files_go_first_past_the_bound() {
        let dir = Scratch::new();
        let (from, _) = span();
        let input = frame(1000);
        let probe = FrameFiles::open(dir.path(), Uuid::new_v4(), 1 << 30).unwrap();
        probe.write("k", from, from, &KindSchema::default(), &input);
        let one = probe.bytes();
        let files = FrameFiles::open(dir.path(), Uuid::new_v4(), one * 2 + one / 2).unwrap();
        let day = |i: i64| from + chrono::Duration::days(i);
        files.write("k", day(0), day(1), &KindSchema::default(), &input);
        files.write("k", day(1), day(2), &KindSchema::default(), &input);
        assert!(files.read("k", day(0), day(1)).is_some());
        files.write("k", day(2), day(3), &KindSchema::default(), &input);
        assert!(files.bytes() <= one * 2 + one / 2);
        assert!(files.read("k", day(0), day(1)).is_some(), "recently read");
        assert!(
            files.read("k", day(1), day(2)).is_none(),
            "least recently used"
        );
        assert!(files.read("k", day(2), day(3)).is_some());
    }
}
