//! The bundle file: an OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) plus
//! transship's `transship-bundle.json` (what a delta expects the destination to hold already),
//! streamed as a tar, zstd-compressed when the file name ends in `.zst`. A bundle is written
//! under a temporary name in the destination directory and renamed once complete and synced,
//! so a bundle under its real name is always whole. Reading recognises zstd by its magic
//! number, whatever the file is called (or when it is a pipe).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::oci::Digest;

/// The annotation naming each `index.json` entry's reference (the image-spec one).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// transship's annotation: when the tag was last resolved upstream (unix seconds, decimal).
pub const RESOLVED: &str = "io.transship.resolved";
pub const OCI_LAYOUT: &str = "oci-layout";
pub const INDEX_JSON: &str = "index.json";
pub const BUNDLE_JSON: &str = "transship-bundle.json";
pub const LAYOUT_VERSION: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Where an OCI image layout keeps `digest`.
pub fn blob_path(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
}

/// The digest a layout path names, if it is a blob path (`./` prefixes allowed).
pub fn parse_blob_path(path: &str) -> Option<Digest> {
    let rest = path.trim_start_matches("./").strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    format!("{alg}:{hex}").parse().ok()
}

/// Whether the bundle at `path` is written zstd-compressed (by its name).
pub fn is_zstd_name(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "zst")
}

enum Sink {
    Plain(BufWriter<File>),
    Zstd(zstd::Encoder<'static, BufWriter<File>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(w) => w.write(buf),
            Self::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(w) => w.flush(),
            Self::Zstd(w) => w.flush(),
        }
    }
}

/// A bundle being written. Dropped unfinished, it removes its temporary file.
pub struct BundleWriter {
    tar: Option<tar::Builder<Sink>>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl BundleWriter {
    pub fn create(dest: &Path) -> io::Result<Self> {
        let name = dest
            .file_name()
            .ok_or_else(|| io::Error::other("the output path names no file"))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".partial-{}", uuid::Uuid::new_v4()));
        let tmp = dest.with_file_name(tmp_name);
        // A bundle may hold private project images: readable by its owner (and group) only.
        let file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create_new(true),
            0o640,
        )
        .open(&tmp)?;
        let out = BufWriter::with_capacity(1 << 20, file);
        let sink = if is_zstd_name(dest) {
            Sink::Zstd(zstd::Encoder::new(out, 3)?)
        } else {
            Sink::Plain(out)
        };
        let mut tar = tar::Builder::new(sink);
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(Self {
            tar: Some(tar),
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    fn builder(&mut self) -> io::Result<&mut tar::Builder<Sink>> {
        self.tar
            .as_mut()
            .ok_or_else(|| io::Error::other("bundle already finished"))
    }

    pub fn add_bytes(&mut self, path: &str, bytes: &[u8]) -> io::Result<()> {
        self.add_reader(path, bytes.len() as u64, bytes)
    }

    /// Adds a file of `size` bytes read from `data` (copied in pieces, never held whole).
    pub fn add_reader(&mut self, path: &str, size: u64, data: impl Read) -> io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        self.builder()?
            .append_data(&mut header, path, data.take(size))
    }

    /// Ends the tar (and the zstd frame), syncs, and renames to the real name. Returns the
    /// bundle's size in bytes.
    pub fn finish(mut self) -> io::Result<u64> {
        let tar = self
            .tar
            .take()
            .ok_or_else(|| io::Error::other("bundle already finished"))?;
        let out = match tar.into_inner()? {
            Sink::Plain(w) => w,
            Sink::Zstd(z) => z.finish()?,
        };
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let size = file.metadata()?.len();
        std::fs::rename(&self.tmp, &self.dest)?;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(size)
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if let Some(tar) = self.tar.take() {
            drop(tar);
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Opens a bundle for reading as a tar stream, decompressing zstd when the file starts with
/// its magic number.
pub fn open_bundle(path: &Path) -> io::Result<tar::Archive<Box<dyn Read + Send>>> {
    let mut file = File::open(path)?;
    let mut head = Vec::with_capacity(4);
    while head.len() < 4 {
        let mut b = [0u8; 4];
        let n = file.read(&mut b[..4 - head.len()])?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&b[..n]);
    }
    let zstd = head == ZSTD_MAGIC;
    let stream = io::Cursor::new(head).chain(file);
    let reader: Box<dyn Read + Send> = if zstd {
        // A bundle is input from elsewhere: cap the decoder's window (16 MiB; our writer's
        // level uses far less) so a crafted frame cannot make it allocate 128 MiB or more.
        let mut d = zstd::Decoder::new(stream)?;
        d.window_log_max(24)?;
        Box::new(d)
    } else {
        Box::new(io::BufReader::with_capacity(1 << 20, stream))
    };
    Ok(tar::Archive::new(reader))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths_round_trip() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(parse_blob_path(&blob_path(&d)), Some(d.clone()));
        assert_eq!(parse_blob_path(&format!("./{}", blob_path(&d))), Some(d));
        for bad in [
            "index.json",
            "blobs/sha256",
            "blobs/md5/00",
            "blobs/sha256/ABC",
        ] {
            assert_eq!(parse_blob_path(bad), None, "{bad}");
        }
    }

    fn round_trip(name: &str) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(name);
        let mut w = BundleWriter::create(&dest).unwrap();
        w.add_bytes(OCI_LAYOUT, LAYOUT_VERSION).unwrap();
        let big = vec![7u8; 3 << 20];
        w.add_reader("blobs/sha256/aa", big.len() as u64, big.as_slice())
            .unwrap();
        assert!(
            !dest.exists(),
            "only the temporary name exists while writing"
        );
        let size = w.finish().unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), size);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut a = open_bundle(&dest).unwrap();
        let mut got = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            got.push((e.path().unwrap().display().to_string(), v));
        }
        assert_eq!(got[0], (OCI_LAYOUT.to_string(), LAYOUT_VERSION.to_vec()));
        assert_eq!(got[1], ("blobs/sha256/aa".to_string(), big));
    }

    #[test]
    fn writes_and_reads_plain_and_zstd() {
        round_trip("b.tar");
        round_trip("b.tar.zst");
    }

    #[test]
    fn an_unfinished_bundle_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BundleWriter::create(&dir.path().join("b.tar.zst")).unwrap();
        w.add_bytes(OCI_LAYOUT, LAYOUT_VERSION).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
