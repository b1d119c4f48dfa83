//! Capped reads of whole documents: a file, a stream or an HTTP body is read into memory only up
//! to a limit, and one that holds more is refused after at most one byte past the limit (a
//! lying or absent length cannot make banger read more). Callers turn "too large" into their
//! own error, naming what they read; this module names nothing.

use futures_util::StreamExt;
use std::io::{self, Read};
use std::path::Path;

/// All of `r` when it holds at most `max` bytes; `Ok(None)` when it holds more.
pub(crate) fn read_at_most(r: impl Read, max: u64) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    r.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= max).then_some(buf))
}

/// [`read_at_most`] of the file at `path`, on the blocking pool. Errors keep their kind
/// (`NotFound` for a missing file) and do not repeat the path: the caller names it.
pub(crate) async fn read_file_at_most(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    let path = path.to_owned();
    let joined =
        tokio::task::spawn_blocking(move || read_at_most(std::fs::File::open(&path)?, max)).await;
    match joined {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(io::Error::other("the runtime is shutting down")),
    }
}

/// Why [`read_body_at_most`] gave up.
#[derive(Debug)]
pub(crate) enum BodyError {
    TooLarge,
    /// The transfer failed; the error carries no URL (it may be a signed storage URL).
    Http(reqwest::Error),
}

/// An HTTP body of at most `max` bytes: refused at once when `Content-Length` says more, and
/// cut off as soon as more arrives.
pub(crate) async fn read_body_at_most(
    resp: reqwest::Response,
    max: u64,
) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Http(e.without_url()))?;
        if body.len() as u64 + chunk.len() as u64 > max {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_up_to_the_cap_pass_and_longer_ones_are_refused() {
        assert_eq!(read_at_most(&b"abc"[..], 3).unwrap(), Some(b"abc".to_vec()));
        assert_eq!(read_at_most(&b""[..], 0).unwrap(), Some(Vec::new()));
        assert_eq!(read_at_most(&b"abcd"[..], 3).unwrap(), None);
        // An endless source is read one byte past the cap, no further.
        let mut endless = io::repeat(b'x');
        assert_eq!(read_at_most(&mut endless, 1 << 20).unwrap(), None);
    }

    #[tokio::test]
    async fn files_are_read_whole_or_refused_and_a_missing_one_keeps_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(
            read_file_at_most(&f, 5).await.unwrap(),
            Some(b"12345".to_vec())
        );
        assert_eq!(read_file_at_most(&f, 4).await.unwrap(), None);
        let err = read_file_at_most(&dir.path().join("nope"), 5)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn bodies_over_the_cap_are_refused() {
        let server = crate::testutil::TestServer::start().await;
        server.serve("/b", vec![7u8; 2000]);
        let get = || async { reqwest::get(server.url("/b")).await.unwrap() };
        assert_eq!(
            read_body_at_most(get().await, 2000).await.unwrap().len(),
            2000
        );
        assert!(matches!(
            read_body_at_most(get().await, 1999).await,
            Err(BodyError::TooLarge)
        ));
    }
}
