//! The PROXY protocol header (HAProxy's, versions 1 and 2) that a tunnel server sends first on a
//! connection when asked to (sish `proxy-protocol=1|2`): who the visitor is. http-echo's
//! `-proxy-protocol` mode reads it and answers with the visitor's address, so a test can see that
//! the app learns it.

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("PROXY header: {why}"))
}

/// Reads one PROXY header (v1 text or v2 binary) from the start of `r`: the visitor's address,
/// or None for `UNKNOWN` / `LOCAL`. Reads nothing past the header.
pub fn read_header(r: &mut impl Read) -> io::Result<Option<SocketAddr>> {
    let mut first = [0u8; 12];
    r.read_exact(&mut first[..5])?;
    if &first[..5] == b"PROXY" {
        // v1: "PROXY TCP4 src dst sport dport\r\n", at most 107 bytes.
        let mut line = b"PROXY".to_vec();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            if line.len() > 107 {
                return Err(invalid("v1 line longer than 107 bytes"));
            }
            r.read_exact(&mut byte)?;
            line.push(byte[0]);
        }
        let text = String::from_utf8(line).map_err(|_| invalid("v1 line is not text"))?;
        let parts: Vec<&str> = text.trim_end().split(' ').collect();
        return match parts.as_slice() {
            ["PROXY", "UNKNOWN", ..] => Ok(None),
            ["PROXY", "TCP4" | "TCP6", src, _dst, sport, _dport] => {
                let ip: IpAddr = src.parse().map_err(|_| invalid("v1 source address"))?;
                let port: u16 = sport.parse().map_err(|_| invalid("v1 source port"))?;
                Ok(Some(SocketAddr::new(ip, port)))
            }
            _ => Err(invalid(&format!("v1 line {text:?}"))),
        };
    }
    r.read_exact(&mut first[5..])?;
    if first != V2_SIGNATURE {
        return Err(invalid("neither v1 (\"PROXY \") nor the v2 signature"));
    }
    let mut head = [0u8; 4];
    r.read_exact(&mut head)?;
    let (version_command, family) = (head[0], head[1]);
    if version_command >> 4 != 2 {
        return Err(invalid("v2 version is not 2"));
    }
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    if version_command & 0x0F == 0 {
        return Ok(None); // LOCAL: the server's own connection (health checks).
    }
    match family >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::new(ip.into(), u16::from_be_bytes([body[8], body[9]]))))
        }
        2 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            Ok(Some(SocketAddr::new(Ipv6Addr::from(octets).into(), u16::from_be_bytes([body[32], body[33]]))))
        }
        0 => Ok(None),
        _ => Err(invalid("v2 address family or length")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v1_and_v2_and_nothing_more() {
        let mut v1: &[u8] = b"PROXY TCP4 127.0.0.9 127.0.0.1 40001 59123\r\nGET";
        assert_eq!(read_header(&mut v1).unwrap(), Some("127.0.0.9:40001".parse().unwrap()));
        assert_eq!(v1, b"GET");
        let mut unknown: &[u8] = b"PROXY UNKNOWN\r\n";
        assert_eq!(read_header(&mut unknown).unwrap(), None);

        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend([0x21, 0x11, 0, 12, 127, 0, 0, 9, 127, 0, 0, 1, 0x9C, 0x41, 0xE6, 0xF3]);
        v2.extend(b"rest");
        let mut r: &[u8] = &v2;
        assert_eq!(read_header(&mut r).unwrap(), Some("127.0.0.9:40001".parse().unwrap()));
        assert_eq!(r, b"rest");
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(read_header(&mut &local[..]).unwrap(), None);
        assert!(read_header(&mut &b"GET / HTTP/1.1\r\n"[..]).is_err());
    }
}
