//! `http-echo`: answers every request with a fixed text, as hashicorp/http-echo does (version
//! 1.0, as the examples pin it) with the flags the examples give it:
//!
//!   http-echo -text="hello from example-app" -listen=:5678
//!
//! Go flag syntax (`-flag=value`, `-flag value`, `--flag`, `-version`), the text from
//! $ECHO_TEXT when -text is not given, the same response headers (X-App-Name, X-App-Version)
//! and `/health`. Plain HTTP/1.x with keep-alive, a thread per connection; one line a request on
//! stdout. Unlike the original, SIGTERM as well as SIGINT ends it, with exit status 0: a pod's
//! containers get SIGTERM, and a Job's must end cleanly.
//!
//! One flag the original lacks, for tests of the PROXY protocol: `-proxy-protocol` expects a
//! PROXY header (v1 or v2, as a tunnel server sends it) at the start of every connection and
//! answers with the visitor's address it carries in an `X-Proxy-Source` response header.

use crate::http::{self, Body, ReadError, Response};
use crate::signals::{self, Blocked, SIGINT, SIGTERM};
use std::io::{self, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The version of hashicorp/http-echo this stands in for (its X-App-Version header).
pub const VERSION: &str = "1.0.0";
const HEALTH: &[u8] = b"{\"status\":\"ok\"}\n";
const USAGE: &str = "Usage of http-echo:
  -listen string
    \taddress and port to listen (default \":5678\")
  -text string
    \ttext to put on the webpage
  -proxy-protocol
    \tread a PROXY protocol header first on each connection (not in the original)
  -version
    \tdisplay version information
";

#[derive(Debug, PartialEq)]
pub struct Config {
    pub text: String,
    pub listen: String,
    /// `-proxy-protocol`: every connection starts with a PROXY header.
    pub proxy_protocol: bool,
}

#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Config),
    Version,
    Help,
}

/// Why the arguments do not make a run, and the exit status the original gives for it.
#[derive(Debug, PartialEq)]
pub enum FlagError {
    /// A flag error, exit status 2 after the usage text (Go's flag package).
    Usage(String),
    /// Exit status 127 (http-echo's own checks).
    Invalid(&'static str),
}

/// Go's strconv.ParseBool.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Parses the arguments after the program name as Go's flag package would, with http-echo's
/// flags. `echo_text` is $ECHO_TEXT.
pub fn parse(args: &[String], echo_text: Option<&str>) -> Result<Parsed, FlagError> {
    let (mut text, mut listen, mut version) = (None, ":5678".to_string(), false);
    let mut proxy_protocol = false;
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        // Flags end at the first argument that is not one ("-" is not), or after "--".
        let Some(flag) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else { break };
        i += 1;
        let flag = match flag.strip_prefix('-') {
            Some("") => break,
            Some(flag) => flag,
            None => flag,
        };
        if flag.starts_with(['-', '=']) {
            return Err(FlagError::Usage(format!("bad flag syntax: {arg}")));
        }
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (flag, None),
        };
        match name {
            "version" => {
                version = value.map_or(Some(true), parse_bool).ok_or_else(|| {
                    FlagError::Usage(format!(
                        "invalid boolean value {:?} for -version: parse error",
                        value.unwrap_or_default()
                    ))
                })?
            }
            "proxy-protocol" => {
                proxy_protocol = value.map_or(Some(true), parse_bool).ok_or_else(|| {
                    FlagError::Usage(format!(
                        "invalid boolean value {:?} for -proxy-protocol: parse error",
                        value.unwrap_or_default()
                    ))
                })?
            }
            "text" | "listen" => {
                let value = match value {
                    Some(value) => value.to_string(),
                    None => {
                        let value =
                            args.get(i).ok_or_else(|| FlagError::Usage(format!("flag needs an argument: -{name}")))?;
                        i += 1;
                        value.clone()
                    }
                };
                if name == "text" {
                    text = Some(value);
                } else {
                    listen = value;
                }
            }
            "h" | "help" => return Ok(Parsed::Help),
            _ => return Err(FlagError::Usage(format!("flag provided but not defined: -{name}"))),
        }
    }
    if version {
        return Ok(Parsed::Version);
    }
    let text = text
        .filter(|t| !t.is_empty())
        .or_else(|| echo_text.filter(|t| !t.is_empty()).map(str::to_string))
        .ok_or(FlagError::Invalid("Missing -text option OR ENV var TEXT is empty!"))?;
    if i < args.len() {
        return Err(FlagError::Invalid("Too many arguments!"));
    }
    Ok(Parsed::Run(Config { text, listen, proxy_protocol }))
}

/// The addresses to try for -listen, in order: `:PORT` is every address, IPv6 and IPv4 alike
/// (`[::]`, which takes IPv4 too), or IPv4 alone where the pod has no IPv6; `HOST:PORT` and
/// `[V6]:PORT` are that host.
pub fn listen_addrs(listen: &str) -> io::Result<Vec<SocketAddr>> {
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("listen {listen}: {why}"));
    let (host, port) = listen.rsplit_once(':').ok_or_else(|| invalid("missing port in address"))?;
    let port: u16 = port.parse().map_err(|_| invalid("invalid port"))?;
    if host.is_empty() {
        return Ok(vec![(Ipv6Addr::UNSPECIFIED, port).into(), (Ipv4Addr::UNSPECIFIED, port).into()]);
    }
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let addrs: Vec<_> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(invalid("no address for the host"));
    }
    Ok(addrs)
}

fn bind(listen: &str) -> io::Result<TcpListener> {
    let mut error = None;
    for addr in listen_addrs(listen)? {
        match TcpListener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => error = Some(e),
        }
    }
    Err(error.unwrap_or_else(|| io::ErrorKind::AddrNotAvailable.into()))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A line on stderr, dated as Go's log package dates it.
fn log(message: &str) {
    let _ = writeln!(io::stderr().lock(), "{} {message}", http::log_date(unix_now()));
}

pub fn run(args: &[String]) -> ExitCode {
    let config = match parse(args, std::env::var("ECHO_TEXT").ok().as_deref()) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Version) => {
            println!("http-echo v{VERSION} (picotun ground-image {})", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Help) => {
            eprint!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(FlagError::Usage(error)) => {
            eprint!("{error}\n{USAGE}");
            return ExitCode::from(2);
        }
        Err(FlagError::Invalid(error)) => {
            eprintln!("{error}");
            return ExitCode::from(127);
        }
    };
    // Before any thread starts, so that none of them takes these signals.
    let blocked = match Blocked::block(&[SIGINT, SIGTERM]) {
        Ok(blocked) => blocked,
        Err(error) => {
            log(&format!("[ERR] blocking signals: {error}"));
            return ExitCode::FAILURE;
        }
    };
    let listener = match bind(&config.listen) {
        Ok(listener) => listener,
        Err(error) => {
            log(&format!("[ERR] server exited with: {error}"));
            return ExitCode::FAILURE;
        }
    };
    log(&format!("[INFO] server is listening on {}", config.listen));
    let text: &'static [u8] = format!("{}\n", config.text).leak().as_bytes();
    let proxy = config.proxy_protocol;
    let spawned = thread::Builder::new().name("accept".into()).spawn(move || accept(&listener, text, proxy));
    if let Err(error) = spawned {
        log(&format!("[ERR] starting the accept thread: {error}"));
        return ExitCode::FAILURE;
    }
    match blocked.wait() {
        Ok(signal) => {
            log(&format!("[INFO] received {}, shutting down...", signals::name(signal)));
            ExitCode::SUCCESS
        }
        Err(error) => {
            log(&format!("[ERR] sigwait: {error}"));
            ExitCode::FAILURE
        }
    }
}

fn accept(listener: &TcpListener, text: &'static [u8], proxy: bool) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                // A small stack: a connection needs little, and the examples allow 32 MiB.
                let spawned =
                    thread::Builder::new().stack_size(128 * 1024).spawn(move || serve(stream, peer, text, proxy));
                if let Err(error) = spawned {
                    log(&format!("[ERR] no thread for {peer}: {error}"));
                }
            }
            Err(error) => {
                // Out of file descriptors and the like: try again shortly instead of spinning.
                log(&format!("[ERR] accept: {error}"));
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Closes a connection without losing the last response: the client may still be sending
/// (a pipelined request, a body not read), and closing with unread data sends a reset that can
/// discard the response before the client reads it. So: end the sending side, then read what
/// comes for a short while.
fn close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0; 4096];
    let started = Instant::now();
    let mut reader = stream;
    while started.elapsed() < Duration::from_millis(500) {
        match reader.read(&mut sink) {
            Ok(1..) => {}
            _ => break,
        }
    }
}

fn serve(stream: TcpStream, peer: SocketAddr, text: &'static [u8], proxy: bool) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = &stream;
    let source = if proxy {
        match crate::proxy::read_header(&mut reader) {
            Ok(Some(visitor)) => visitor.to_string(),
            Ok(None) => "unknown".to_string(),
            Err(error) => {
                log(&format!("[ERR] {peer}: {error}"));
                return;
            }
        }
    } else {
        String::new()
    };
    let mut headers = vec![("X-App-Name", "http-echo"), ("X-App-Version", VERSION)];
    if proxy {
        headers.push(("X-Proxy-Source", source.as_str()));
    }
    loop {
        let request = match http::read_request(&mut reader) {
            Ok(request) => request,
            Err(ReadError::Closed | ReadError::Io) => return,
            Err(ReadError::Status(status)) => return refuse(&stream, status),
        };
        let started = Instant::now();
        if request.expect_continue && request.http11 && request.body != Body::Empty {
            let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        match http::discard_body(&mut reader, &request.body) {
            Ok(()) => {}
            Err(ReadError::Status(status)) => return refuse(&stream, status),
            Err(_) => return,
        }
        let body = if request.path == "/health" { HEALTH } else { text };
        let response = Response {
            status: 200,
            http11: request.http11,
            keep_alive: request.keep_alive,
            headers: &headers,
            date: &http::http_date(unix_now()),
            body,
            head: request.method == "HEAD",
        };
        if writer.write_all(&response.bytes()).is_err() {
            return;
        }
        // Go's net/http logs the URL's path, the handler the bytes written (none for HEAD).
        let written = if response.head { 0 } else { body.len() };
        let _ = writeln!(
            io::stdout().lock(),
            "{} {} {peer} \"{} {} {}\" 200 {written} \"{}\" {:?}",
            http::log_date(unix_now()),
            request.host,
            request.method,
            request.path,
            request.version,
            request.user_agent,
            started.elapsed(),
        );
        if !request.keep_alive {
            return close(&stream);
        }
    }
}

/// Answers a request that cannot be served with `status` and closes the connection.
fn refuse(stream: &TcpStream, status: u16) {
    let body = format!("{status} {}", http::reason(status));
    let response = Response {
        status,
        http11: true,
        keep_alive: false,
        headers: &[],
        date: &http::http_date(unix_now()),
        body: body.as_bytes(),
        head: false,
    };
    let mut writer = stream;
    if writer.write_all(&response.bytes()).is_ok() {
        close(stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    fn run_config(text: &str, listen: &str) -> Result<Parsed, FlagError> {
        Ok(Parsed::Run(Config { text: text.into(), listen: listen.into(), proxy_protocol: false }))
    }

    #[test]
    fn proxy_protocol_is_a_flag_of_its_own() {
        let parsed = parse(&args(&["-text=x", "-proxy-protocol"]), None);
        assert_eq!(parsed, Ok(Parsed::Run(Config { text: "x".into(), listen: ":5678".into(), proxy_protocol: true })));
        assert!(matches!(parse(&args(&["-text=x", "-proxy-protocol=maybe"]), None), Err(FlagError::Usage(_))));
    }

    #[test]
    fn parses_the_examples_flags() {
        let parsed = parse(&args(&["-text=hello from example-app", "-listen=:5678"]), None);
        assert_eq!(parsed, run_config("hello from example-app", ":5678"));
        assert_eq!(parse(&args(&["-text=hi"]), None), run_config("hi", ":5678"), "the default address");
        let parsed = parse(&args(&["--listen", "127.0.0.1:5678", "-text", "a=b"]), None);
        assert_eq!(parsed, run_config("a=b", "127.0.0.1:5678"));
        assert_eq!(parse(&args(&["-text=x=y"]), None), run_config("x=y", ":5678"));
        assert_eq!(parse(&args(&["-text=a", "-text=b"]), None), run_config("b", ":5678"), "the last one counts");
    }

    #[test]
    fn version_help_and_the_environment() {
        assert_eq!(parse(&args(&["-version"]), None), Ok(Parsed::Version));
        assert_eq!(parse(&args(&["--version=true"]), None), Ok(Parsed::Version));
        assert_eq!(parse(&args(&["-version=false", "-text=t"]), None), run_config("t", ":5678"));
        assert_eq!(parse(&args(&["-h"]), None), Ok(Parsed::Help));
        assert_eq!(parse(&args(&["-help"]), None), Ok(Parsed::Help));
        assert_eq!(parse(&args(&[]), Some("from env")), run_config("from env", ":5678"));
        assert_eq!(parse(&args(&["-text="]), Some("from env")), run_config("from env", ":5678"));
        assert_eq!(parse(&args(&["-text=flag"]), Some("env")), run_config("flag", ":5678"));
    }

    #[test]
    fn flag_errors() {
        let usage = |s: &str| Err(FlagError::Usage(s.to_string()));
        assert_eq!(parse(&args(&["-port=1"]), None), usage("flag provided but not defined: -port"));
        assert_eq!(parse(&args(&["-text"]), None), usage("flag needs an argument: -text"));
        assert_eq!(parse(&args(&["---text=a"]), None), usage("bad flag syntax: ---text=a"));
        assert_eq!(parse(&args(&["-=a"]), None), usage("bad flag syntax: -=a"));
        assert_eq!(
            parse(&args(&["-version=yes"]), None),
            usage("invalid boolean value \"yes\" for -version: parse error")
        );
        let missing = Err(FlagError::Invalid("Missing -text option OR ENV var TEXT is empty!"));
        assert_eq!(parse(&args(&[]), None), missing);
        assert_eq!(parse(&args(&["-text="]), Some("")), missing);
        let too_many = Err(FlagError::Invalid("Too many arguments!"));
        assert_eq!(parse(&args(&["-text=a", "extra"]), None), too_many);
        assert_eq!(parse(&args(&["-text=a", "--", "-listen=:1"]), None), too_many, "flags end at --");
        assert_eq!(parse(&args(&["-text=a", "-", "-listen=:1"]), None), too_many, "flags end at -");
    }

    #[test]
    fn listen_addresses() {
        let addrs = |l: &str| listen_addrs(l).unwrap().iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(addrs(":5678"), ["[::]:5678", "0.0.0.0:5678"]);
        assert_eq!(addrs("127.0.0.1:5678"), ["127.0.0.1:5678"]);
        assert_eq!(addrs("[::1]:80"), ["[::1]:80"]);
        assert!(listen_addrs("5678").is_err());
        assert!(listen_addrs(":http").is_err());
        assert!(listen_addrs(":70000").is_err());
    }

    /// `-proxy-protocol`: the visitor's address from a PROXY v1 header, in `X-Proxy-Source`.
    #[test]
    fn answers_with_the_proxy_source() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || accept(&listener, b"hi\n", true));
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(
            b"PROXY TCP4 127.0.0.7 127.0.0.1 40001 59124\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        assert!(got.contains("X-Proxy-Source: 127.0.0.7:40001\r\n") && got.ends_with("hi\n"), "{got:?}");
    }

    /// The server end to end on a loopback port: keep-alive, pipelining, HEAD, /health, close.
    #[test]
    fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || accept(&listener, b"hello from example-app\n", false));

        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\nHEAD /x HTTP/1.1\r\nHost: demo\r\n\r\n").unwrap();
        conn.write_all(b"POST /health HTTP/1.1\r\nHost: demo\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody")
            .unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        let responses: Vec<_> = got.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(responses.len(), 3, "{got}");
        for r in &responses {
            assert!(r.starts_with("200 OK\r\nX-App-Name: http-echo\r\nX-App-Version: 1.0.0\r\nDate: "), "{r}");
            assert!(r.contains("\r\nContent-Type: text/plain; charset=utf-8\r\n"), "{r}");
        }
        assert!(responses[0].ends_with(
            "Content-Length: 23\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello from example-app\n"
        ));
        assert!(
            responses[1].ends_with("Content-Length: 23\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"),
            "HEAD: no body"
        );
        assert!(responses[2].ends_with("Connection: close\r\n\r\n{\"status\":\"ok\"}\n"));

        // HTTP/1.0 as nc sends it: the answer in 1.0, then the server closes.
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.0 200 OK\r\n") && got.ends_with("\r\n\r\nhello from example-app\n"), "{got}");

        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        assert!(
            got.starts_with("HTTP/1.1 400 Bad Request\r\n")
                && got.ends_with("Connection: close\r\n\r\n400 Bad Request"),
            "{got}"
        );
    }
}
