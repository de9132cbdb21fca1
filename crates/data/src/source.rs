//! Opening input files: gzip detected by its magic bytes, opening at a byte
//! offset, and a line reader for the text formats with a bounded line length
//! that numbers lines and tells where each starts.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::DataError;

/// Longest line the text readers accept; a longer one is an error, not an allocation.
pub const LINE_BYTES_MAX: usize = 16 << 20;
/// Read buffer of the file readers, and the bytes the line reader asks for at a time.
const READ_BUFFER_BYTES: usize = 1 << 20;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Reads up to `buf.len()` bytes from the start of `path` (fewer if the file is shorter).
pub(crate) fn sniff(path: &Path, buf: &mut [u8]) -> Result<usize, DataError> {
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DataError::io(path, e)),
        }
    }
    Ok(filled)
}

/// True if the file starts with the gzip magic bytes.
pub(crate) fn is_gzip(path: &Path) -> Result<bool, DataError> {
    let mut magic = [0u8; 2];
    Ok(sniff(path, &mut magic)? == 2 && magic == GZIP_MAGIC)
}

/// Opens `path` for buffered reading, decompressing it if it is gzip (by magic, not name).
pub(crate) fn open(path: &Path) -> Result<Box<dyn BufRead>, DataError> {
    Ok(Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, open_at(path, 0)?)))
}

/// Opens `path` positioned at byte `offset` of its content (decompressed, for
/// gzip). A plain file seeks there; a gzip stream cannot seek, so the bytes
/// before `offset` are decompressed and thrown away (no line is looked at).
pub(crate) fn open_at(path: &Path, offset: u64) -> Result<Box<dyn Read>, DataError> {
    let gz = is_gzip(path)?;
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    if !gz {
        file.seek(SeekFrom::Start(offset)).map_err(|e| DataError::io(path, e))?;
        return Ok(Box::new(file));
    }
    let mut stream = MultiGzDecoder::new(file);
    if offset > 0 {
        let skipped =
            std::io::copy(&mut (&mut stream).take(offset), &mut std::io::sink()).map_err(|e| DataError::io(path, e))?;
        if skipped < offset {
            return Err(DataError::format(
                path,
                format!("the decompressed stream ends at byte {skipped}, before byte {offset}"),
            ));
        }
    }
    Ok(Box::new(stream))
}

/// One line: its number (1-based), the offset of its first byte in the
/// stream, and its bytes without the `\n` or `\r\n`.
#[derive(Debug)]
pub(crate) struct Line<'a> {
    pub number: u64,
    pub offset: u64,
    pub bytes: &'a [u8],
}

/// Lines of a text stream, each at most [`LINE_BYTES_MAX`] long. Lines are
/// found with a SIMD newline search over a buffer of [`READ_BUFFER_BYTES`]
/// and handed out as slices of it: no copy and no allocation per line, so a
/// scan that only looks at the first bytes of each line runs at memory speed.
pub(crate) struct Lines<R> {
    reader: R,
    buf: Vec<u8>,
    /// `buf[start..end]` is read but not yet handed out; its first `searched` bytes hold no newline.
    start: usize,
    end: usize,
    searched: usize,
    eof: bool,
    /// Number of the next line and the stream offset of its first byte.
    line: u64,
    offset: u64,
    path: PathBuf,
}

impl<R: Read> Lines<R> {
    pub(crate) fn new(reader: R, path: &Path) -> Self {
        Self::starting_at(reader, path, 1, 0)
    }

    /// Lines of `reader`, which is positioned at byte `offset` of the stream,
    /// the start of line number `line`: numbers and offsets stay those of the whole file.
    pub(crate) fn starting_at(reader: R, path: &Path, line: u64, offset: u64) -> Self {
        Self {
            reader,
            buf: vec![0; READ_BUFFER_BYTES],
            start: 0,
            end: 0,
            searched: 0,
            eof: false,
            line,
            offset,
            path: path.to_owned(),
        }
    }

    /// The next line, or `None` at the end.
    pub(crate) fn next_line(&mut self) -> Result<Option<Line<'_>>, DataError> {
        loop {
            let from = self.start + self.searched;
            if let Some(i) = memchr::memchr(b'\n', &self.buf[from..self.end]) {
                let newline = from + i;
                if newline - self.start > LINE_BYTES_MAX {
                    return Err(self.too_long());
                }
                return Ok(Some(self.hand_out(newline, newline + 1)));
            }
            self.searched = self.end - self.start;
            if self.searched > LINE_BYTES_MAX {
                return Err(self.too_long());
            }
            if self.eof {
                if self.end == self.start {
                    return Ok(None);
                }
                let end = self.end;
                return Ok(Some(self.hand_out(end, end)));
            }
            self.fill()?;
        }
    }

    /// Hands out `buf[start..content_end]` (less a final `\r`); the next line starts at `next`.
    fn hand_out(&mut self, content_end: usize, next: usize) -> Line<'_> {
        let first = self.start;
        let mut last = content_end;
        if last > first && self.buf[last - 1] == b'\r' {
            last -= 1;
        }
        let (number, offset) = (self.line, self.offset);
        self.line += 1;
        self.offset += (next - first) as u64;
        self.start = next;
        self.searched = 0;
        Line {
            number,
            offset,
            bytes: &self.buf[first..last],
        }
    }

    /// Reads more: the unfinished line moves to the front, and the buffer
    /// grows only when that line fills it (bounded by `LINE_BYTES_MAX`).
    fn fill(&mut self) -> Result<(), DataError> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let grown = self.buf.len() * 2;
            self.buf.resize(grown, 0);
        }
        loop {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DataError::io(&self.path, e)),
            }
        }
    }

    fn too_long(&self) -> DataError {
        DataError::line(
            &self.path,
            self.line,
            format!("line longer than LINE_BYTES_MAX ({LINE_BYTES_MAX} bytes)"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_strip_line_ends_and_count() {
        let mut lines = Lines::new(&b"a\r\nbb\n\nc"[..], Path::new("t"));
        let mut got = Vec::new();
        while let Some(l) = lines.next_line().expect("in-memory read") {
            got.push((l.number, l.bytes.to_vec()));
        }
        let want: Vec<(u64, Vec<u8>)> = vec![
            (1, b"a".to_vec()),
            (2, b"bb".to_vec()),
            (3, Vec::new()),
            (4, b"c".to_vec()),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn overlong_line_is_an_error_with_its_number() {
        let mut text = b"ok\n".to_vec();
        text.resize(3 + LINE_BYTES_MAX + 10, b'x');
        let mut lines = Lines::new(&text[..], Path::new("big.svm"));
        assert!(lines.next_line().expect("first line").is_some());
        let err = lines.next_line().expect_err("second line is too long").to_string();
        assert!(err.starts_with("big.svm:2: line longer"), "{err}");
    }

    /// A reader that hands out at most `step` bytes per call, so that lines straddle reads.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    proptest::proptest! {
        /// Numbers, offsets and bytes are those of a plain split on `\n`,
        /// however the reads fall, and from any line start.
        #[test]
        fn lines_match_a_plain_split(text in "[a\r\n ]{0,300}", step in 1usize..40, skip in 0usize..20) {
            let mut want = Vec::new();
            let mut offset = 0u64;
            let body = text.as_bytes();
            let pieces: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
            for (i, piece) in pieces.iter().enumerate() {
                if i + 1 == pieces.len() && piece.is_empty() {
                    break;
                }
                let content = piece.strip_suffix(b"\r").unwrap_or(piece);
                want.push((i as u64 + 1, offset, content.to_vec()));
                offset += piece.len() as u64 + 1;
            }
            let skip = skip.min(want.len());
            let (line, at) = want.get(skip).map_or((want.len() as u64 + 1, body.len() as u64), |w| (w.0, w.1));
            let reader = Trickle { bytes: &body[at as usize..], step };
            let mut lines = Lines::starting_at(reader, Path::new("t"), line, at);
            let mut got = Vec::new();
            while let Some(l) = lines.next_line().expect("in-memory read") {
                got.push((l.number, l.offset, l.bytes.to_vec()));
            }
            proptest::prop_assert_eq!(got, want[skip..].to_vec());
        }
    }

    #[test]
    fn open_at_seeks_plain_files_and_skips_into_gzip_streams() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("p.txt");
        std::fs::write(&plain, b"0123456789").expect("write");
        let gz = dir.path().join("g.txt.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"0123456789").expect("gzip to memory");
        std::fs::write(&gz, enc.finish().expect("gzip to memory")).expect("write");
        for path in [&plain, &gz] {
            let mut s = String::new();
            open_at(path, 4).expect("open").read_to_string(&mut s).expect("read");
            assert_eq!(s, "456789", "{}", path.display());
        }
        let err = open_at(&gz, 11).err().expect("past the end").to_string();
        assert!(
            err.contains("g.txt.gz: the decompressed stream ends at byte 10"),
            "{err}"
        );
    }

    #[test]
    fn gzip_is_detected_by_magic_not_name() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plain-name.txt");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"hello\n").expect("gzip to memory");
        std::fs::write(&path, enc.finish().expect("gzip to memory")).expect("write");
        let mut s = String::new();
        open(&path).expect("open").read_to_string(&mut s).expect("read");
        assert_eq!(s, "hello\n");
        assert!(matches!(open(&dir.path().join("missing")), Err(DataError::Io { .. })));
    }
}
