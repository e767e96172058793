//! Who listens where a local server is reached: the gateway reaches a server run as a local
//! process by 127.0.0.1 and its port alone, so what listens there must be the gateway's own
//! user's (the server, run as that user), never another user's program that took the port
//! in the moment between the gateway's check and the server's bind, or later.
//!
//! Read from Linux's socket tables (`/proc/net/tcp*`, this network namespace's); elsewhere
//! nothing is known. A program of the gateway's own user is not told apart from the server:
//! that user can do anything to the gateway already.

/// What listens where 127.0.0.1:`port` connections land.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Listeners {
    /// Nobody (yet).
    None,
    /// Only sockets of the user judged for.
    Own,
    /// At least one socket of another user (by its uid).
    Foreign(u32),
    /// The tables cannot be read here.
    Unknown,
}

/// What listens where 127.0.0.1:`port` connections land, judged for user `uid`.
pub(crate) fn listeners_on(port: u16, uid: u32) -> Listeners {
    let mut read = false;
    let mut found = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        read = true;
        for owner in text
            .lines()
            .skip(1)
            .filter_map(|l| loopback_listener(l, port))
        {
            if owner != uid {
                return Listeners::Foreign(owner);
            }
            found = true;
        }
    }
    match (read, found) {
        (false, _) => Listeners::Unknown,
        (true, false) => Listeners::None,
        (true, true) => Listeners::Own,
    }
}

/// The owner's uid of a socket table line that listens where 127.0.0.1:`port` connections
/// land: on 127.0.0.1, on every IPv4 address, or on every IPv6 address or ::ffff:127.0.0.1
/// (which take IPv4 too unless IPv6-only, which the table does not say: counted either way).
/// (`sl local_address rem_address st tx:rx tr:when retrnsmt uid ...`; addresses in hex as the
/// kernel stores them.)
fn loopback_listener(line: &str, port: u16) -> Option<u32> {
    let fields: Vec<&str> = line.split_whitespace().take(8).collect();
    let [_, local, _, state, _, _, _, uid] = fields[..] else {
        return None;
    };
    const LISTEN: &str = "0A";
    const V4_LOOPBACK: &str = "0100007F";
    const V4_ANY: &str = "00000000";
    const V6_ANY: &str = "00000000000000000000000000000000";
    const V6_MAPPED_LOOPBACK: &str = "0000000000000000FFFF00000100007F";
    let (address, local_port) = local.rsplit_once(':')?;
    let reaches = matches!(
        address.to_ascii_uppercase().as_str(),
        V4_LOOPBACK | V4_ANY | V6_ANY | V6_MAPPED_LOOPBACK
    );
    (state == LISTEN && reaches && u16::from_str_radix(local_port, 16).ok()? == port)
        .then(|| uid.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(address: &str, state: &str, uid: u32) -> String {
        format!(
            "   3: {address}:1F90 00000000:0000 {state} 00000000:00000000 00:00000000 00000000 {uid:>5}        0 424242 1 0000000000000000 100 0 0 10 0"
        )
    }

    #[test]
    fn only_listeners_that_take_loopback_connections_count() {
        assert_eq!(
            loopback_listener(&line("0100007F", "0A", 7), 0x1F90),
            Some(7)
        );
        assert_eq!(
            loopback_listener(&line("00000000", "0A", 7), 0x1F90),
            Some(7)
        );
        let v6_any = "00000000000000000000000000000000";
        assert_eq!(loopback_listener(&line(v6_any, "0A", 7), 0x1F90), Some(7));
        let mapped = "0000000000000000FFFF00000100007F";
        assert_eq!(loopback_listener(&line(mapped, "0A", 7), 0x1F90), Some(7));
        // Elsewhere (127.0.0.2, ::1, a LAN address): 127.0.0.1 connections do not land there.
        assert_eq!(loopback_listener(&line("0200007F", "0A", 7), 0x1F90), None);
        let v6_loopback = "00000000000000000000000001000000";
        assert_eq!(loopback_listener(&line(v6_loopback, "0A", 7), 0x1F90), None);
        assert_eq!(loopback_listener(&line("0100007F", "01", 7), 0x1F90), None);
        assert_eq!(loopback_listener(&line("0100007F", "0A", 7), 0x1F91), None);
        assert_eq!(loopback_listener("garbage", 1), None);
    }

    #[test]
    fn a_listener_is_judged_by_its_user() {
        let uid = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self").expect("Linux /proc").uid()
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listeners_on(port, uid), Listeners::Own);
        assert_eq!(listeners_on(port, uid + 1), Listeners::Foreign(uid));
        drop(listener);
        assert_eq!(listeners_on(port, uid), Listeners::None);
    }
}
