//! Just enough HTTP/1.x for an echo server: a request's head (request line and the headers that
//! decide framing and keep-alive), its body read to the end and dropped (Content-Length or
//! chunked), and the bytes of a response. Dates for the Date header and for log lines.

use std::io::{self, BufRead, Read};

/// The most a request's head (request line and headers) may take; more is answered with 431.
const MAX_HEAD: u64 = 64 * 1024;
/// The most a chunk-size line or a trailer line of a chunked body may take.
const MAX_CHUNK_LINE: u64 = 4 * 1024;

#[derive(Debug, PartialEq)]
pub struct Request {
    pub method: String,
    /// The target's path: without the query, and without scheme and authority in absolute form.
    pub path: String,
    /// "HTTP/1.1" or "HTTP/1.0", as the request line said.
    pub version: String,
    pub http11: bool,
    pub host: String,
    pub user_agent: String,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub body: Body,
}

#[derive(Debug, PartialEq)]
pub enum Body {
    Empty,
    Length(u64),
    Chunked,
}

#[derive(Debug)]
pub enum ReadError {
    /// The connection ended cleanly before a request began.
    Closed,
    /// The connection broke (or ended in the middle of a request): nothing to answer.
    Io,
    /// A request that gets this status code, and then the connection is closed.
    Status(u16),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Io
    }
}

/// Reads one line (up to LF) of at most `*budget` bytes, and takes its length from the budget.
/// `Ok(None)` at the end of the stream before any byte of the line; a line that does not fit
/// is `too_long`. The line is returned without its CRLF (or bare LF).
fn read_line(reader: &mut impl BufRead, budget: &mut u64, too_long: u16) -> Result<Option<Vec<u8>>, ReadError> {
    let mut line = Vec::new();
    let read = reader.by_ref().take(*budget).read_until(b'\n', &mut line)?;
    *budget -= read as u64;
    if line.last() != Some(&b'\n') {
        return match (read, *budget) {
            (0, 1..) => Ok(None),
            (_, 0) => Err(ReadError::Status(too_long)),
            _ => Err(ReadError::Io),
        };
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The path of a request target: origin form `/a?b`, absolute form `http://host/a?b`, `*`.
fn target_path(target: &str) -> String {
    let mut path = target;
    if let Some((scheme, rest)) = target.split_once("://")
        && is_token(scheme)
    {
        path = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    path.split(['?', '#']).next().unwrap_or_default().to_string()
}

/// Reads a request's head. Leading empty lines are skipped (RFC 9112, section 2.2).
pub fn read_request(reader: &mut impl BufRead) -> Result<Request, ReadError> {
    let mut budget = MAX_HEAD;
    let line = loop {
        match read_line(reader, &mut budget, 431)? {
            None => return Err(ReadError::Closed),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let line = String::from_utf8(line).map_err(|_| ReadError::Status(400))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Status(400));
    };
    if !is_token(method) || target.is_empty() {
        return Err(ReadError::Status(400));
    }
    let http11 = match version.strip_prefix("HTTP/").and_then(|v| v.split_once('.')) {
        Some(("1", "0")) => false,
        Some(("1", minor)) if !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit()) => true,
        Some((major, minor))
            if [major, minor].iter().all(|n| n.len() == 1 && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            return Err(ReadError::Status(505));
        }
        _ => return Err(ReadError::Status(400)),
    };

    let mut host = None;
    let mut user_agent = String::new();
    let mut length = None;
    let mut chunked = false;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    loop {
        let Some(line) = read_line(reader, &mut budget, 431)? else {
            return Err(ReadError::Io);
        };
        if line.is_empty() {
            break;
        }
        // Header values may carry any octet (obs-text); names are tokens.
        let line = String::from_utf8_lossy(&line);
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Status(400));
        };
        if !is_token(name) {
            return Err(ReadError::Status(400)); // also a folded line (obs-fold) or space before ':'
        }
        let value = value.trim_matches([' ', '\t']);
        match name.to_ascii_lowercase().as_str() {
            "host" if host.is_some() => return Err(ReadError::Status(400)),
            "host" => host = Some(value.to_string()),
            "user-agent" => user_agent = value.to_string(),
            "content-length" => {
                let n = value
                    .parse::<u64>()
                    .ok()
                    .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or(ReadError::Status(400))?;
                if length.is_some_and(|l| l != n) {
                    return Err(ReadError::Status(400));
                }
                length = Some(n);
            }
            "transfer-encoding" if value.eq_ignore_ascii_case("chunked") && !chunked => chunked = true,
            "transfer-encoding" => return Err(ReadError::Status(501)),
            "connection" => {
                for option in value.split(',').map(|o| o.trim_matches([' ', '\t'])) {
                    close |= option.eq_ignore_ascii_case("close");
                    keep_alive |= option.eq_ignore_ascii_case("keep-alive");
                }
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    if http11 && host.is_none() {
        return Err(ReadError::Status(400)); // RFC 9112, section 3.2
    }
    let body = match (chunked, length) {
        (true, _) => Body::Chunked,
        (false, Some(n)) if n > 0 => Body::Length(n),
        (false, _) => Body::Empty,
    };
    Ok(Request {
        method: method.to_string(),
        path: target_path(target),
        version: version.to_string(),
        http11,
        host: host.unwrap_or_default(),
        user_agent,
        // With both Transfer-Encoding and Content-Length the framing is suspect (request
        // smuggling): answer, then close (RFC 9112, section 6.3).
        keep_alive: !close && (http11 || keep_alive) && !(chunked && length.is_some()),
        expect_continue,
        body,
    })
}

/// Reads a request's body to its end and drops it.
pub fn discard_body(reader: &mut impl BufRead, body: &Body) -> Result<(), ReadError> {
    fn skip(reader: &mut impl BufRead, n: u64) -> Result<(), ReadError> {
        if io::copy(&mut reader.by_ref().take(n), &mut io::sink())? < n {
            return Err(ReadError::Io);
        }
        Ok(())
    }
    // One line of a chunked body, at most `limit` bytes with its CRLF; the stream must go on.
    fn line(reader: &mut impl BufRead, mut limit: u64) -> Result<Vec<u8>, ReadError> {
        read_line(reader, &mut limit, 400)?.ok_or(ReadError::Io)
    }
    match *body {
        Body::Empty => Ok(()),
        Body::Length(n) => skip(reader, n),
        Body::Chunked => loop {
            let size = String::from_utf8_lossy(&line(reader, MAX_CHUNK_LINE)?).into_owned();
            let size = size.split(';').next().unwrap_or_default().trim_matches([' ', '\t']);
            let size = u64::from_str_radix(size, 16).map_err(|_| ReadError::Status(400))?;
            if size == 0 {
                // Trailer fields, up to the empty line.
                while !line(reader, MAX_CHUNK_LINE)?.is_empty() {}
                return Ok(());
            }
            skip(reader, size)?;
            if !line(reader, 2)?.is_empty() {
                return Err(ReadError::Status(400)); // the chunk is longer than its size said
            }
        },
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

pub struct Response<'a> {
    pub status: u16,
    pub http11: bool,
    pub keep_alive: bool,
    /// Extra headers, before Date (as Go's net/http orders them: set ones first, sorted).
    pub headers: &'a [(&'a str, &'a str)],
    pub date: &'a str,
    pub body: &'a [u8],
    /// A HEAD request: Content-Length of the body, but not the body.
    pub head: bool,
}

impl Response<'_> {
    pub fn bytes(&self) -> Vec<u8> {
        let version = if self.http11 { "HTTP/1.1" } else { "HTTP/1.0" };
        let mut head = format!("{version} {} {}\r\n", self.status, reason(self.status));
        for (name, value) in self.headers {
            head += &format!("{name}: {value}\r\n");
        }
        head += &format!(
            "Date: {}\r\nContent-Length: {}\r\nContent-Type: text/plain; charset=utf-8\r\n",
            self.date,
            self.body.len()
        );
        match (self.keep_alive, self.http11) {
            (false, _) => head += "Connection: close\r\n",
            (true, false) => head += "Connection: keep-alive\r\n",
            (true, true) => {}
        }
        head += "\r\n";
        let mut bytes = head.into_bytes();
        if !self.head {
            bytes.extend_from_slice(self.body);
        }
        bytes
    }
}

/// UTC calendar fields of a Unix time: (year, month 1-12, day, hour, minute, second, weekday
/// 0 = Sunday). Days to civil date after Howard Hinnant's days_from_civil inverse.
fn civil(unix: u64) -> (u64, u64, u64, u64, u64, u64, u64) {
    let (days, secs) = (unix / 86400, unix % 86400);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day, secs / 3600, secs / 60 % 60, secs % 60, (days + 4) % 7)
}

/// The IMF-fixdate of the Date header: `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let (y, mo, d, h, mi, s, wd) = civil(unix);
    format!("{}, {d:02} {} {y} {h:02}:{mi:02}:{s:02} GMT", DAYS[wd as usize], MONTHS[mo as usize - 1])
}

/// The time of a log line, as Go's log package writes it (in UTC): `1994/11/06 08:49:37`.
pub fn log_date(unix: u64) -> String {
    let (y, mo, d, h, mi, s, _) = civil(unix);
    format!("{y}/{mo:02}/{d:02} {h:02}:{mi:02}:{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &str) -> Result<Request, ReadError> {
        read_request(&mut bytes.as_bytes())
    }

    fn status(bytes: &str) -> Option<u16> {
        match read(bytes) {
            Err(ReadError::Status(s)) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn reads_a_request_head() {
        let r = read("GET /a/b?c=d HTTP/1.1\r\nHost: demo\r\nUser-Agent: curl/8\r\n\r\n").unwrap();
        assert_eq!(
            r,
            Request {
                method: "GET".into(),
                path: "/a/b".into(),
                version: "HTTP/1.1".into(),
                http11: true,
                host: "demo".into(),
                user_agent: "curl/8".into(),
                keep_alive: true,
                expect_continue: false,
                body: Body::Empty,
            }
        );
        assert_eq!(read("GET http://demo:80/x?y HTTP/1.1\r\nHost: demo\r\n\r\n").unwrap().path, "/x");
        assert_eq!(read("\r\nGET / HTTP/1.1\nhost:demo\n\n").unwrap().host, "demo");
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let ka = |head: &str| read(head).unwrap().keep_alive;
        assert!(ka("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, Close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        let smuggle = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(!ka(smuggle));
        assert_eq!(read(smuggle).unwrap().body, Body::Chunked);
    }

    #[test]
    fn rejects_malformed_requests() {
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), Some(400), "no Host");
        assert_eq!(status("GET  / HTTP/1.1\r\nHost: a\r\n\r\n"), Some(400));
        assert_eq!(status("GET / FTP/1.1\r\nHost: a\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), Some(505));
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nHost : a\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), Some(400));
        assert_eq!(status("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n"), Some(400));
        assert_eq!(status("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), Some(400));
        assert_eq!(status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"), Some(501));
        let huge = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "x".repeat(70_000));
        assert_eq!(status(&huge), Some(431));
        assert!(matches!(read(""), Err(ReadError::Closed)));
        assert!(matches!(read("GET / HTTP/1.1\r\nHost: a\r\n"), Err(ReadError::Io)));
    }

    #[test]
    fn discards_bodies_and_keeps_the_next_request() {
        let mut stream =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /2 HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes();
        let first = read_request(&mut stream).unwrap();
        assert_eq!(first.body, Body::Length(5));
        discard_body(&mut stream, &first.body).unwrap();
        assert_eq!(read_request(&mut stream).unwrap().path, "/2");

        let mut stream = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: t\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes();
        let first = read_request(&mut stream).unwrap();
        discard_body(&mut stream, &first.body).unwrap();
        assert_eq!(read_request(&mut stream).unwrap().path, "/3");

        let mut bad = "5\r\nhelloXX\r\n0\r\n\r\n".as_bytes();
        assert!(matches!(discard_body(&mut bad, &Body::Chunked), Err(ReadError::Status(400))));
        let mut short = "hel".as_bytes();
        assert!(matches!(discard_body(&mut short, &Body::Length(5)), Err(ReadError::Io)));
    }

    #[test]
    fn response_bytes() {
        let date = http_date(784_111_777);
        let headers = [("X-App-Name", "http-echo")];
        let response = |http11, keep_alive, head| {
            let r = Response { status: 200, http11, keep_alive, headers: &headers, date: &date, body: b"hi\n", head };
            String::from_utf8(r.bytes()).unwrap()
        };
        let common = "X-App-Name: http-echo\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 3\r\nContent-Type: text/plain; charset=utf-8\r\n";
        assert_eq!(response(true, true, false), format!("HTTP/1.1 200 OK\r\n{common}\r\nhi\n"));
        assert_eq!(response(true, false, false), format!("HTTP/1.1 200 OK\r\n{common}Connection: close\r\n\r\nhi\n"));
        assert_eq!(
            response(false, true, false),
            format!("HTTP/1.0 200 OK\r\n{common}Connection: keep-alive\r\n\r\nhi\n")
        );
        assert_eq!(response(true, true, true), format!("HTTP/1.1 200 OK\r\n{common}\r\n"));
    }

    #[test]
    fn dates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(4_107_542_399), "Sun, 28 Feb 2100 23:59:59 GMT"); // 2100: no leap day
        assert_eq!(http_date(4_107_542_400), "Mon, 01 Mar 2100 00:00:00 GMT");
        assert_eq!(http_date(13_569_465_599), "Fri, 31 Dec 2399 23:59:59 GMT");
        assert_eq!(log_date(1_767_225_600), "2026/01/01 00:00:00");
    }
}
