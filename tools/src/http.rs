//! The node's metrics endpoint: a small HTTP/1.x server on one thread that answers `GET`s
//! with whatever a handler returns. Every connection is non-blocking and waited on with
//! `poll`, so a client that connects and sends nothing, or sends half a request, delays no
//! other: it is closed at its deadline, and at most [`MAX_OPEN`] are held (the oldest is
//! closed to make room for a new one).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

/// Most connections held at once.
pub const MAX_OPEN: usize = 256;
/// Longest request head read (request line and headers).
const MAX_HEAD_BYTES: usize = 8192;
/// How long a connection has to send its request and take the answer.
pub const DEADLINE: Duration = Duration::from_secs(2);

/// An answer: status line text, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// For example `200 OK`.
    pub status: &'static str,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

struct Open {
    stream: TcpStream,
    deadline: Instant,
    /// The request head read so far.
    head: Vec<u8>,
    /// The answer once the head is in, and how much of it is sent.
    out: Option<(Vec<u8>, usize)>,
}

/// Serves `listener` until `stop` is set (checked at least every 200 ms), answering each
/// request's path with `answer`. A request that is not a `GET` gets a 405; a head over 8 KiB
/// a 431.
///
/// # Errors
///
/// If the listener cannot be made non-blocking, or `poll` fails for a reason other than a
/// signal.
pub fn serve(
    listener: &TcpListener,
    stop: &Arc<AtomicBool>,
    answer: impl Fn(&str) -> Answer,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut open: VecDeque<Open> = VecDeque::new();
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        open.retain(|c| c.deadline > now);
        let wait = open
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::MAX)
            .min(Duration::from_millis(200));
        let ready: Vec<PollFlags> = {
            let mut fds = Vec::with_capacity(open.len() + 1);
            fds.push(PollFd::new(listener, PollFlags::IN));
            for c in &open {
                let wanted = if c.out.is_some() {
                    PollFlags::OUT
                } else {
                    PollFlags::IN
                };
                fds.push(PollFd::new(&c.stream, wanted));
            }
            let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
                tv_sec: 0,
                tv_nsec: 200_000_000,
            });
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            fds.iter().map(PollFd::revents).collect()
        };
        // Connections first (their indices are those polled), then new ones.
        let mut index = 0;
        open.retain_mut(|c| {
            index += 1;
            ready[index].is_empty() || progress(c, &answer)
        });
        if !ready[0].is_empty() {
            accept_all(listener, &mut open);
        }
    }
    Ok(())
}

fn accept_all(listener: &TcpListener, open: &mut VecDeque<Open>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if open.len() >= MAX_OPEN {
                    // The oldest has waited longest: it gives way.
                    open.pop_front();
                }
                open.push_back(Open {
                    stream,
                    deadline: Instant::now() + DEADLINE,
                    head: Vec::new(),
                    out: None,
                });
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // WouldBlock: all taken. Anything else (out of descriptors): try at the next poll.
            Err(_) => return,
        }
    }
}

/// Reads or writes what the connection is ready for; `false` once it is done with.
fn progress(c: &mut Open, answer: &impl Fn(&str) -> Answer) -> bool {
    if let Some((out, sent)) = &mut c.out {
        return match c.stream.write(&out[*sent..]) {
            Ok(n) if n > 0 => {
                *sent += n;
                *sent < out.len()
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => true,
            _ => false,
        };
    }
    let mut chunk = [0u8; 1024];
    let room = MAX_HEAD_BYTES - c.head.len();
    let n = match c.stream.read(&mut chunk[..room.min(1024)]) {
        Ok(0) => return false,
        Ok(n) => n,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
            return true;
        }
        Err(_) => return false,
    };
    c.head.extend_from_slice(&chunk[..n]);
    let reply = if let Some(head) = complete_head(&c.head) {
        let line = head.lines().next().unwrap_or("");
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("GET"), Some(path)) => answer(path),
            _ => Answer {
                status: "405 Method Not Allowed",
                content_type: "text/plain",
                body: "GET /metrics or GET /health\n".to_owned(),
            },
        }
    } else if c.head.len() >= MAX_HEAD_BYTES {
        Answer {
            status: "431 Request Header Fields Too Large",
            content_type: "text/plain",
            body: "request head over 8 KiB\n".to_owned(),
        }
    } else {
        return true;
    };
    let Answer {
        status,
        content_type,
        body,
    } = reply;
    let out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    c.out = Some((out.into_bytes(), 0));
    // Most answers fit the socket's buffer: send now rather than after another poll.
    progress(c, answer)
}

/// The request head, once the blank line that ends it has arrived.
fn complete_head(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    let end = text.find("\r\n\r\n").or_else(|| text.find("\n\n"))?;
    Some(&text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn get(addr: std::net::SocketAddr, request: &[u8]) -> (String, Duration) {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        let mut text = String::new();
        std::io::BufReader::new(s)
            .read_to_string(&mut text)
            .unwrap();
        (text, started.elapsed())
    }

    fn server() -> (
        std::net::SocketAddr,
        Arc<AtomicBool>,
        std::thread::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            serve(&listener, &flag, |path| Answer {
                status: if path == "/health" {
                    "200 OK"
                } else {
                    "404 Not Found"
                },
                content_type: "text/plain",
                body: format!("{path}\n"),
            })
            .unwrap();
        });
        (addr, stop, thread)
    }

    #[test]
    fn quiet_and_half_sent_connections_do_not_delay_an_answer() {
        let (addr, stop, thread) = server();
        // More quiet ones than are held: the oldest give way, none blocks the answer.
        let quiet: Vec<TcpStream> = (0..MAX_OPEN + 50)
            .map(|i| {
                let mut s = TcpStream::connect(addr).unwrap();
                if i % 2 == 0 {
                    s.write_all(b"GET /heal").unwrap();
                }
                s
            })
            .collect();
        let (text, took) = get(addr, b"GET /health HTTP/1.0\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n/health\n"), "{text}");
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
        // The quiet ones are closed at their deadline (or earlier, to make room).
        let mut newest = quiet.into_iter().last().unwrap();
        newest
            .set_read_timeout(Some(DEADLINE + Duration::from_secs(3)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(newest.read(&mut byte).unwrap(), 0, "closed by the server");
        stop.store(true, Ordering::Release);
        thread.join().unwrap();
    }

    #[test]
    fn other_methods_and_long_heads_are_refused() {
        let (addr, stop, thread) = server();
        let (text, _) = get(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 405 "), "{text}");
        let (text, _) = get(addr, b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 404 "), "{text}");
        let mut long = b"GET /health HTTP/1.1\r\nX: ".to_vec();
        // Exactly the most the server reads, with no end to the head.
        long.resize(MAX_HEAD_BYTES, b'a');
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&long).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 431 "), "{line}");
        stop.store(true, Ordering::Release);
        thread.join().unwrap();
    }
}
