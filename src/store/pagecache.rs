//! Page-cache residency: whether a range of a file can be read without waiting for the disk
//! (so serving decides between reading inline and moving the read to a blocking thread), and
//! the hints that start a read early or let a one-off read (scrub) leave the cache as it was.
//! Every answer errs towards "not resident": the blocking path is always correct, only slower.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
    })
}

/// Whether every page of `ptr..ptr + len` is in the page cache. The range must lie inside one
/// live mapping of a file (it is never touched, so pages past the end of the file are simply
/// "not resident"); `ptr` need not be page-aligned. `scratch` is reused between calls.
pub fn mapped_range_resident(ptr: *const u8, len: usize, scratch: &mut Vec<u8>) -> bool {
    if len == 0 {
        return true;
    }
    let page = page_size();
    let addr = ptr as usize;
    let start = addr & !(page - 1);
    let span = addr + len - start;
    scratch.clear();
    scratch.resize(span.div_ceil(page), 0);
    // SAFETY: `start..start + span` lies in a mapping the caller holds (page-aligned down from
    // `ptr`, which is inside it, and mappings are page-granular); mincore only reads page
    // tables and writes one byte per page into `scratch`, which has exactly that many.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, span, scratch.as_mut_ptr()) };
    rc == 0 && scratch.iter().all(|b| b & 1 == 1)
}

/// Whether `offset..offset + len` of `file` is in the page cache (maps the range for the
/// question only; nothing is read). The range must not extend past the end of the file.
pub fn file_range_resident(file: &File, offset: u64, len: usize, scratch: &mut Vec<u8>) -> bool {
    if len == 0 {
        return true;
    }
    // SAFETY: the mapping is only passed to mincore, never dereferenced.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    };
    map.is_ok_and(|m| mapped_range_resident(m.as_ptr(), len, scratch))
}

/// Asks the kernel to start reading `offset..offset + len` into the page cache, without
/// waiting for it.
pub fn read_ahead(file: &File, offset: u64, len: u64) {
    advise(file, offset, len, libc::POSIX_FADV_WILLNEED);
}

/// Lets the kernel drop `offset..offset + len` of `file` from the page cache (clean pages not
/// mapped elsewhere go; others stay).
pub fn drop_cached(file: &File, offset: u64, len: u64) {
    advise(file, offset, len, libc::POSIX_FADV_DONTNEED);
}

fn advise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on an open descriptor; failure only means the hint is lost.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, advice);
    }
}

/// Reads `buf.len()` bytes at `offset` only if that needs no wait for the disk (`preadv2`
/// with `RWF_NOWAIT`, or a residency check where the filesystem does not support it).
/// `Ok(false)`: not (all) cached — the caller reads on a blocking thread instead.
pub fn read_if_cached(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<bool> {
    let Ok(off) = i64::try_from(offset) else {
        return Ok(false);
    };
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec describing `buf`, which outlives the call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) => Ok(false),
            Some(libc::EOPNOTSUPP | libc::EINVAL) => {
                if !file_range_resident(file, offset, buf.len(), &mut Vec::new()) {
                    return Ok(false);
                }
                std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)?;
                Ok(true)
            }
            _ => Err(e),
        };
    }
    Ok(n as usize == buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_file_is_resident_and_dropped_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = vec![7u8; 1 << 20];
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        let mut scratch = Vec::new();
        // Just written: in the page cache (dirty or clean).
        assert!(file_range_resident(&f, 4096, 8192, &mut scratch));
        let mut buf = vec![0u8; 4096];
        assert!(read_if_cached(&f, 100, &mut buf).unwrap());
        assert_eq!(buf, vec![7u8; 4096]);
        // Clean and drop it: on a filesystem with a page cache it is then gone (tmpfs keeps
        // the pages). A non-blocking read then starts the read and answers "not cached"
        // unless the bytes arrived at once — either way it never returns wrong bytes.
        f.sync_all().unwrap();
        drop_cached(&f, 0, 0);
        let mut buf = vec![0u8; 4096];
        if read_if_cached(&f, 8192, &mut buf).unwrap() {
            assert_eq!(buf, vec![7u8; 4096]);
        }
        assert!(mapped_range_resident(std::ptr::null(), 0, &mut scratch));
    }
}
