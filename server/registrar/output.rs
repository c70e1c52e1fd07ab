//! Command output kept within a bound: a node's command (or an operator's hand-off hook) can
//! print without end, and a worker must not hold all of it. The tail is kept, because that is
//! where a failing command says why; the count of bytes dropped from the front is kept too.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Output kept per stream of one command: far above what any role step prints (a CSR, an
/// `ovs-vsctl` read-back, a few KiB), so checks of the output never see a cut one.
pub const CAP: usize = 1 << 20;

/// The last [`CAP`] bytes of a stream.
#[derive(Debug, Default)]
pub struct Tail {
    buf: Vec<u8>,
    dropped: u64,
}

impl Tail {
    /// Appends `data`, dropping the oldest bytes past the cap.
    pub fn push(&mut self, data: &[u8]) {
        if data.len() >= CAP {
            self.dropped += (self.buf.len() + data.len() - CAP) as u64;
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - CAP..]);
            return;
        }
        let over = (self.buf.len() + data.len()).saturating_sub(CAP);
        if over > 0 {
            // Drained at most once per CAP/2 bytes taken in, so pushing stays linear.
            let cut = over.max(CAP / 2).min(self.buf.len());
            self.buf.drain(..cut);
            self.dropped += cut as u64;
        }
        self.buf.extend_from_slice(data);
    }

    /// The text kept, prefixed with how much was dropped (if anything was).
    pub fn into_string(self) -> String {
        let text = String::from_utf8_lossy(&self.buf);
        if self.dropped == 0 {
            text.into_owned()
        } else {
            format!("[{} earlier bytes dropped]\n{text}", self.dropped)
        }
    }

    /// Reads `r` to its end into a tail.
    pub async fn read_all(mut r: impl AsyncRead + Unpin) -> std::io::Result<Tail> {
        let mut t = Tail::default();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = r.read(&mut chunk).await?;
            if n == 0 {
                return Ok(t);
            }
            t.push(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_output_keeps_the_tail_and_counts_the_rest() {
        let mut t = Tail::default();
        let line = b"0123456789abcdef";
        let mut total = 0u64;
        for _ in 0..(3 * CAP / line.len()) {
            t.push(line);
            total += line.len() as u64;
            assert!(t.buf.len() <= CAP);
        }
        t.push(b"the error is here\n");
        total += 18;
        let kept = t.buf.len() as u64;
        assert_eq!(t.dropped + kept, total);
        let s = t.into_string();
        assert!(
            s.starts_with(&format!("[{} earlier bytes dropped]\n", total - kept)),
            "{}",
            &s[..60]
        );
        assert!(s.ends_with("the error is here\n"));
        // One huge write keeps exactly its last CAP bytes.
        let mut t = Tail::default();
        t.push(&vec![b'x'; 2 * CAP + 5]);
        assert_eq!((t.buf.len(), t.dropped), (CAP, CAP as u64 + 5));
        // Short output is untouched.
        let mut t = Tail::default();
        t.push(b"ok\n");
        assert_eq!(t.into_string(), "ok\n");
    }

    #[tokio::test]
    async fn a_hook_printing_without_end_is_read_in_bounded_memory() {
        let mut c = tokio::process::Command::new("sh");
        c.args(["-c", "head -c 5000000 /dev/zero; echo; echo last words"])
            .stdout(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let t = Tail::read_all(child.stdout.take().unwrap()).await.unwrap();
        child.wait().await.unwrap();
        assert!(t.buf.len() <= CAP);
        assert!(t.into_string().ends_with("last words\n"));
    }
}
