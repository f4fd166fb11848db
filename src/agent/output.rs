//! What tunnel servers print on the session channel, turned into events.
//!
//! sish (tuns.sh) and sandhole report the real public address of every forward only as text,
//! coloured with ANSI codes and ended by `\r\n`, possibly split across channel messages. This
//! module buffers lines, strips colour and recognises the lines that matter. Pure; no I/O.

/// Something a server said that the agent acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerLine {
    /// sish: `Starting SSH Forwarding service for http:80. ...` -- a block about the forward
    /// just requested begins.
    SishBlock { kind: String, port: String },
    /// sish: `HTTP: http://host`, `HTTPS: https://host`, `TCP: host:port`, `TLS: host`,
    /// `TCP Alias: name`.
    SishAddress { label: String, address: String },
    /// sish: `The subdomain X is unavailable. Assigning a random subdomain.` (or port, alias):
    /// the next block is for a name or port we did not ask for.
    SishUnavailable { what: String },
    /// sandhole: `Starting HTTP on http://app.sandhole.test:8080 for address app`.
    SandholeHttp { url: String, requested: String },
    /// sandhole: `Starting TCP port on sandhole.test:46099`.
    SandholeTcp { address: String, port: u16 },
}

/// Accumulates session-channel bytes and yields complete, colour-free lines.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

/// A line longer than this is cut: a server flooding the session channel must not grow memory.
const MAX_LINE: usize = 4096;

impl LineBuffer {
    pub fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in data {
            if b == b'\n' {
                lines.push(strip_ansi(&String::from_utf8_lossy(&self.pending)).trim_end_matches('\r').to_string());
                self.pending.clear();
            } else if self.pending.len() < MAX_LINE {
                self.pending.push(b);
            }
        }
        lines
    }
}

/// Removes ANSI escape sequences (CSI `ESC [ ... final`, and two-byte `ESC x`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                // Parameters and intermediates, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                // OSC: until BEL or ST.
                while let Some(c) = chars.next() {
                    if c == '\x07' || (c == '\x1b' && chars.peek() == Some(&'\\')) {
                        chars.next_if_eq(&'\\');
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Recognises a colour-free line, or returns None for chatter.
pub fn parse_line(line: &str) -> Option<ServerLine> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("Starting SSH Forwarding service for ") {
        let target = rest.split_whitespace().next()?.trim_end_matches('.');
        let (kind, port) = target.split_once(':')?;
        return Some(ServerLine::SishBlock { kind: kind.to_string(), port: port.to_string() });
    }
    if line.starts_with("The ") && line.contains(" is unavailable.") {
        let what = line.trim_start_matches("The ").split(" is unavailable.").next()?.to_string();
        return Some(ServerLine::SishUnavailable { what });
    }
    for label in ["HTTPS", "HTTP", "TCP Alias", "TCP", "TLS"] {
        if let Some(address) = line.strip_prefix(label).and_then(|r| r.strip_prefix(": ")) {
            let address = address.trim();
            if !address.is_empty() && !address.contains(' ') {
                return Some(ServerLine::SishAddress { label: label.to_string(), address: address.to_string() });
            }
        }
    }
    // sandhole prefixes a timestamp; find the phrase anywhere.
    if let Some(idx) = line.find("Starting HTTP on ") {
        let rest = &line[idx + "Starting HTTP on ".len()..];
        let (url, requested) = rest.split_once(" for address ")?;
        return Some(ServerLine::SandholeHttp { url: url.trim().to_string(), requested: requested.trim().to_string() });
    }
    if let Some(idx) = line.find("Starting TCP port on ") {
        let address = line[idx + "Starting TCP port on ".len()..].trim();
        let port = address.rsplit_once(':')?.1.parse().ok()?;
        return Some(ServerLine::SandholeTcp { address: address.to_string(), port });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colour_codes() {
        assert_eq!(strip_ansi("\x1b[44mHTTPS\x1b[0m: https://a"), "HTTPS: https://a");
        assert_eq!(strip_ansi("\x1b[1m\x1b[32m Starting TCP\x1b[39m\x1b[0m port"), " Starting TCP port");
        assert_eq!(strip_ansi("\x1b]0;title\x07plain"), "plain");
        assert_eq!(strip_ansi("no codes"), "no codes");
    }

    #[test]
    fn buffers_lines_across_messages() {
        let mut b = LineBuffer::default();
        assert!(b.push(b"HTTP").is_empty());
        assert_eq!(b.push(b"S: https://x\r\nTCP: h:1\r\npart"), vec!["HTTPS: https://x", "TCP: h:1"]);
        assert_eq!(b.push(b"ial\n"), vec!["partial"]);
    }

    #[test]
    fn bounds_a_line_that_never_ends() {
        let mut b = LineBuffer::default();
        b.push(&vec![b'x'; 100_000]);
        assert_eq!(b.push(b"\n")[0].len(), MAX_LINE);
    }

    #[test]
    fn recognises_sish_blocks() {
        // As sish prints them, colour included.
        let raw = "Starting SSH Forwarding service for \x1b[32mhttp:80\x1b[0m. Forwarded connections can be accessed via the following methods:\r\n\
                   \x1b[44mHTTP\x1b[0m: http://alice-demo.tuns.sh\r\n\
                   \x1b[44mHTTPS\x1b[0m: https://alice-demo.tuns.sh\r\n";
        let mut b = LineBuffer::default();
        let parsed: Vec<_> = b.push(raw.as_bytes()).iter().filter_map(|l| parse_line(l)).collect();
        assert_eq!(
            parsed,
            vec![
                ServerLine::SishBlock { kind: "http".into(), port: "80".into() },
                ServerLine::SishAddress { label: "HTTP".into(), address: "http://alice-demo.tuns.sh".into() },
                ServerLine::SishAddress { label: "HTTPS".into(), address: "https://alice-demo.tuns.sh".into() },
            ]
        );
        assert_eq!(
            parse_line("TCP: nue.tuns.sh:59123"),
            Some(ServerLine::SishAddress { label: "TCP".into(), address: "nue.tuns.sh:59123".into() })
        );
        assert_eq!(
            parse_line(&strip_ansi(
                "The subdomain \x1b[31malice-demo.tuns.sh\x1b[0m is unavailable. Assigning a random subdomain."
            )),
            Some(ServerLine::SishUnavailable { what: "subdomain alice-demo.tuns.sh".into() })
        );
        assert_eq!(
            parse_line("The TCP port 5432 is unavailable. Assigning a random port."),
            Some(ServerLine::SishUnavailable { what: "TCP port 5432".into() })
        );
    }

    #[test]
    fn recognises_sandhole_lines() {
        // Captured from sandhole 0.10.5 (timestamps and colour included).
        let raw = "\x1b[2m2026-11-24T08:22:55.043321232Z\x1b[0m \x1b[1m\x1b[32m Starting HTTP\x1b[39m\x1b[0m on \x1b[4mhttp://app.sandhole.test:44811\x1b[0m for address app\r\n\
                   \x1b[2m2026-11-24T08:22:55.043426648Z\x1b[0m \x1b[1m\x1b[32m  Starting TCP\x1b[39m\x1b[0m port on sandhole.test:46099\r\n";
        let mut b = LineBuffer::default();
        let parsed: Vec<_> = b.push(raw.as_bytes()).iter().filter_map(|l| parse_line(l)).collect();
        assert_eq!(
            parsed,
            vec![
                ServerLine::SandholeHttp { url: "http://app.sandhole.test:44811".into(), requested: "app".into() },
                ServerLine::SandholeTcp { address: "sandhole.test:46099".into(), port: 46099 },
            ]
        );
    }

    #[test]
    fn ignores_chatter() {
        for line in ["", "Press Ctrl-C to close the session.", "Proxy protocol enabled for TCP connections.", "HTTP: "]
        {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
    }
}
