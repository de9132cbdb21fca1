//! Opening input files: gzip detected by its magic bytes, and a line reader
//! with a bounded line length for the text formats.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::DataError;

/// Longest line the text readers accept; a longer one is an error, not an allocation.
pub const LINE_BYTES_MAX: usize = 16 << 20;
/// Read buffer of the file readers.
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
    let gz = is_gzip(path)?;
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| DataError::io(path, e))?;
    Ok(if gz {
        Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, file))
    })
}

/// Lines of a text file without their `\n` or `\r\n`, numbered from 1, each at
/// most [`LINE_BYTES_MAX`] long. The buffer is reused: no allocation per line.
pub(crate) struct Lines<R> {
    reader: R,
    buf: Vec<u8>,
    line: u64,
    path: PathBuf,
}

impl<R: BufRead> Lines<R> {
    pub(crate) fn new(reader: R, path: &Path) -> Self {
        Self {
            reader,
            buf: Vec::new(),
            line: 0,
            path: path.to_owned(),
        }
    }

    /// The next line and its number (1-based), or `None` at the end.
    pub(crate) fn next_line(&mut self) -> Result<Option<(u64, &[u8])>, DataError> {
        self.buf.clear();
        let limit = LINE_BYTES_MAX as u64 + 1;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| DataError::io(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        let mut end = self.buf.len();
        if self.buf[end - 1] == b'\n' {
            end -= 1;
        } else if end > LINE_BYTES_MAX {
            return Err(DataError::line(
                &self.path,
                self.line,
                format!("line longer than LINE_BYTES_MAX ({LINE_BYTES_MAX} bytes)"),
            ));
        }
        if end > 0 && self.buf[end - 1] == b'\r' {
            end -= 1;
        }
        Ok(Some((self.line, &self.buf[..end])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_strip_line_ends_and_count() {
        let mut lines = Lines::new(&b"a\r\nbb\n\nc"[..], Path::new("t"));
        let mut got = Vec::new();
        while let Some((n, l)) = lines.next_line().expect("in-memory read") {
            got.push((n, l.to_vec()));
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
