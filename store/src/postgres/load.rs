//! Loading a span of records on PostgreSQL: binary `COPY … TO STDOUT` decoded straight
//! into the sink, with no row objects in between.
//!
//! One `REPEATABLE READ` transaction reads the span's summary (`record_hours`) and then
//! copies its records, so the summary describes exactly what the copy returned. A full
//! load (`after` = 0) needs no `seq` per row and so reads `records` alone; an extension
//! joins `record_batches` to keep only rows above `after`. Neither sorts: the frame is
//! ordered where it is built, which is cheaper than PostgreSQL sorting on one core.

use bytes::{Buf, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use uuid::Uuid;

use scholia_events::store::{RecordRow, RecordSink, Summary};
use scholia_events::{Error, Result};

use super::shared::records::span_summary;
use super::{PG_EPOCH_MICROS, PgStore};
use crate::error::{Ctx, corrupt};

/// The binary `COPY` signature and the two header words after it.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
const COLUMNS: i16 = 5;

impl PgStore {
    pub(crate) async fn load_records(
        &self,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after: i64,
        sink: &mut dyn RecordSink,
    ) -> Result<Summary> {
        let mut tx = self
            .begin_with(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                "beginning a read",
            )
            .await?;
        let summary = span_summary(&mut tx, kind, from, to).await?;
        if summary.rows == 0 || summary.max_seq <= after {
            tx.commit().await.ctx("ending a read")?;
            return Ok(summary);
        }
        if after == 0 {
            sink.reserve(usize::try_from(summary.rows).unwrap_or(0));
        }
        let span = format!(
            "r.kind = {} AND r.created >= '{}' AND r.created < '{}'",
            literal(kind),
            from.to_rfc3339(),
            to.to_rfc3339()
        );
        let columns = "r.data_id, r.source, r.created, r.received_at, r.data";
        let select = match super::shared::records::batches_after(&mut tx, after).await? {
            // A rebuild after a few batches: read those batches' records (through their
            // index; the span's own rows are not scanned) and keep the span's. The fence
            // keeps the planner off the span's index however stale its statistics are.
            Some(list) => {
                format!(
                    "WITH fresh AS MATERIALIZED (SELECT {columns} , r.kind FROM records r \
                     WHERE r.batch IN ({list})) SELECT data_id, source, created, received_at, data \
                     FROM fresh r WHERE {span}"
                )
            }
            _ if after > 0 => format!(
                "SELECT {columns} FROM records r WHERE {span} \
                 AND r.batch IN (SELECT batch FROM record_batches WHERE seq > {after})"
            ),
            _ => format!("SELECT {columns} FROM records r WHERE {span}"),
        };
        let statement = format!("COPY ({select}) TO STDOUT (FORMAT binary)");
        {
            let mut stream = tx.copy_out_raw(&statement).await.ctx("reading records")?;
            let mut decoder = Decoder::default();
            while let Some(chunk) = stream.try_next().await.ctx("reading records")? {
                decoder.feed(chunk, sink)?;
            }
            decoder.finish()?;
        }
        tx.commit().await.ctx("ending a read")?;
        Ok(summary)
    }
}

/// A string as an SQL literal (the statement of a `COPY` takes no parameters).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Decodes binary `COPY` rows of (uuid, text, timestamptz, timestamptz, jsonb) as chunks
/// arrive; a row split across chunks waits in `pending`.
#[derive(Default)]
struct Decoder {
    pending: BytesMut,
    header_seen: bool,
    ended: bool,
}

fn malformed(what: &str) -> Error {
    corrupt(
        "reading records",
        format!("the binary COPY stream is malformed ({what})"),
    )
}

impl Decoder {
    fn feed(&mut self, chunk: Bytes, sink: &mut dyn RecordSink) -> Result<()> {
        if self.pending.is_empty() {
            let mut buf: &[u8] = &chunk;
            self.rows(&mut buf, sink)?;
            self.pending.extend_from_slice(buf);
        } else {
            self.pending.extend_from_slice(&chunk);
            let pending = std::mem::take(&mut self.pending);
            let mut buf: &[u8] = &pending;
            self.rows(&mut buf, sink)?;
            self.pending.extend_from_slice(buf);
        }
        Ok(())
    }

    /// Consume every complete row at the front of `buf`, leaving a partial one.
    fn rows(&mut self, buf: &mut &[u8], sink: &mut dyn RecordSink) -> Result<()> {
        if !self.header_seen {
            // Signature, flags (i32), header extension length (i32) and the extension.
            if buf.len() < SIGNATURE.len() + 8 {
                return Ok(());
            }
            if &buf[..SIGNATURE.len()] != SIGNATURE {
                return Err(malformed("no signature"));
            }
            let extension = u32::from_be_bytes(
                buf[SIGNATURE.len() + 4..SIGNATURE.len() + 8]
                    .try_into()
                    .unwrap(),
            ) as usize;
            let header = SIGNATURE.len() + 8 + extension;
            if buf.len() < header {
                return Ok(());
            }
            buf.advance(header);
            self.header_seen = true;
        }
        while !buf.is_empty() {
            if self.ended {
                return Err(malformed("data after the trailer"));
            }
            match parse_row(buf)? {
                Some((Row::End, used)) => {
                    self.ended = true;
                    buf.advance(used);
                }
                Some((Row::Record(row), used)) => {
                    sink.push(row);
                    buf.advance(used);
                }
                None => return Ok(()),
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if !self.ended || !self.pending.is_empty() {
            return Err(malformed("it ended early"));
        }
        Ok(())
    }
}

enum Row<'a> {
    Record(RecordRow<'a>),
    End,
}

/// One row from the front of `buf` and the bytes it took, or `None` when it is not all
/// there yet.
fn parse_row<'a>(buf: &'a [u8]) -> Result<Option<(Row<'a>, usize)>> {
    let mut at = 0usize;
    let Some(count) = take(buf, &mut at, 2) else {
        return Ok(None);
    };
    let count = i16::from_be_bytes(count.try_into().unwrap());
    if count == -1 {
        return Ok(Some((Row::End, at)));
    }
    if count != COLUMNS {
        return Err(malformed("unexpected column count"));
    }
    let mut fields: [&[u8]; COLUMNS as usize] = [&[]; COLUMNS as usize];
    for field in &mut fields {
        let Some(len) = take(buf, &mut at, 4) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes(len.try_into().unwrap());
        if len < 0 {
            return Err(malformed("a NULL in a NOT NULL column"));
        }
        let Some(value) = take(buf, &mut at, len as usize) else {
            return Ok(None);
        };
        *field = value;
    }
    let [id, source, created, received_at, data] = fields;
    let id = Uuid::from_slice(id).map_err(|_| malformed("a uuid not 16 bytes long"))?;
    let text =
        |bytes: &'a [u8]| std::str::from_utf8(bytes).map_err(|_| malformed("text not UTF-8"));
    let time = |bytes: &[u8]| -> Result<i64> {
        let micros: [u8; 8] = bytes
            .try_into()
            .map_err(|_| malformed("a timestamp not 8 bytes long"))?;
        Ok(i64::from_be_bytes(micros) + PG_EPOCH_MICROS)
    };
    // jsonb's binary form is a version byte (1) and the JSON text.
    let data = match data.split_first() {
        Some((1, json)) => text(json)?,
        _ => return Err(malformed("an unknown jsonb version")),
    };
    let row = RecordRow {
        data_id: id,
        source: text(source)?,
        created: time(created)?,
        received_at: time(received_at)?,
        data,
    };
    Ok(Some((Row::Record(row), at)))
}

fn take<'a>(buf: &'a [u8], at: &mut usize, len: usize) -> Option<&'a [u8]> {
    let end = at.checked_add(len)?;
    let slice = buf.get(*at..end)?;
    *at = end;
    Some(slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Vec<(Uuid, String, i64, i64, String)>);

    impl RecordSink for Collect {
        fn push(&mut self, row: RecordRow<'_>) {
            self.0.push((
                row.data_id,
                row.source.to_string(),
                row.created,
                row.received_at,
                row.data.to_string(),
            ));
        }
    }

    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    }

    fn stream(rows: &[(Uuid, &str, i64, &str)]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        for (id, source, created, data) in rows {
            out.extend_from_slice(&COLUMNS.to_be_bytes());
            field(&mut out, id.as_bytes());
            field(&mut out, source.as_bytes());
            field(&mut out, &(created - PG_EPOCH_MICROS).to_be_bytes());
            field(&mut out, &(created - PG_EPOCH_MICROS + 1).to_be_bytes());
            let mut json = vec![1u8];
            json.extend_from_slice(data.as_bytes());
            field(&mut out, &json);
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    #[test]
    fn rows_split_anywhere_across_chunks_decode_alike() {
        let rows: Vec<(Uuid, &str, i64, &str)> = (0..20)
            .map(|i| {
                (
                    Uuid::now_v7(),
                    "plant-7",
                    1_700_000_000_000_000 + i,
                    r#"{"mw": 1.5}"#,
                )
            })
            .collect();
        let bytes = stream(&rows);
        for size in [1, 3, 7, 64, bytes.len()] {
            let mut sink = Collect(Vec::new());
            let mut decoder = Decoder::default();
            for chunk in bytes.chunks(size) {
                decoder
                    .feed(Bytes::copy_from_slice(chunk), &mut sink)
                    .unwrap();
            }
            decoder.finish().unwrap();
            assert_eq!(sink.0.len(), rows.len(), "chunks of {size}");
            for (got, want) in sink.0.iter().zip(&rows) {
                assert_eq!(got.0, want.0);
                assert_eq!(got.1, want.1);
                assert_eq!(got.2, want.2);
                assert_eq!(got.3, want.2 + 1);
                assert_eq!(got.4, want.3);
            }
        }
    }

    #[test]
    fn a_truncated_stream_is_an_error_not_fewer_rows() {
        let bytes = stream(&[(Uuid::now_v7(), "s", 0, "{}")]);
        let mut decoder = Decoder::default();
        let mut sink = Collect(Vec::new());
        decoder
            .feed(Bytes::copy_from_slice(&bytes[..bytes.len() - 5]), &mut sink)
            .unwrap();
        assert!(decoder.finish().is_err());
    }
}
