//! `IpSet`: address ranges (CIDRs) from a setting or a file, answering
//! "contains" with one hash lookup per prefix length present. Shared: the
//! settings validate with it, invalid-traffic checks match with it.

use std::collections::HashSet;
use std::net::IpAddr;

/// A set of address ranges (CIDRs), answering "contains" with one hash lookup
/// per prefix length in the set.
#[derive(Debug, Default, Clone)]
pub struct IpSet {
    v4: Vec<(u32, HashSet<u32>)>,
    v6: Vec<(u32, HashSet<u128>)>,
}

impl IpSet {
    /// Parses addresses and CIDRs separated by commas, spaces or lines; `#`
    /// starts a comment. The error names the first bad entry.
    pub fn parse(text: &str) -> Result<IpSet, String> {
        let mut set = IpSet::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            for item in line.split([',', ' ', '\t']).filter(|s| !s.is_empty()) {
                set.insert(item)
                    .map_err(|_| format!("not an address or CIDR: {item:?}"))?;
            }
        }
        Ok(set)
    }

    fn insert(&mut self, item: &str) -> Result<(), ()> {
        let (addr, len) = match item.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u32>().map_err(|_| ())?)),
            None => (item, None),
        };
        match addr.parse::<IpAddr>().map_err(|_| ())? {
            IpAddr::V4(a) => {
                let len = len.unwrap_or(32);
                if len > 32 {
                    return Err(());
                }
                let key = mask4(u32::from(a), len);
                match self.v4.iter_mut().find(|(l, _)| *l == len) {
                    Some((_, s)) => {
                        s.insert(key);
                    }
                    None => self.v4.push((len, HashSet::from([key]))),
                }
            }
            IpAddr::V6(a) => {
                let len = len.unwrap_or(128);
                if len > 128 {
                    return Err(());
                }
                let key = mask6(u128::from(a), len);
                match self.v6.iter_mut().find(|(l, _)| *l == len) {
                    Some((_, s)) => {
                        s.insert(key);
                    }
                    None => self.v6.push((len, HashSet::from([key]))),
                }
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether `ip` is in one of the ranges (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().any(|(len, s)| s.contains(&mask4(a, *len)))
            }
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => self.contains(IpAddr::V4(v4)),
                None => {
                    let a = u128::from(a);
                    self.v6.iter().any(|(len, s)| s.contains(&mask6(a, *len)))
                }
            },
        }
    }
}

fn mask4(a: u32, len: u32) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - len))
    }
}

fn mask6(a: u128, len: u32) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidrs_match_at_their_prefix_and_bad_entries_are_named() {
        let s = IpSet::parse("# comment\n10.0.0.0/8\n2001:db8::/32 192.0.2.1").expect("set");
        assert!(s.contains(ip("10.255.0.1")));
        assert!(!s.contains(ip("11.0.0.1")));
        assert!(s.contains(ip("2001:db8:1::5")));
        assert!(!s.contains(ip("2001:db9::5")));
        assert!(s.contains(ip("192.0.2.1")));
        assert!(!s.contains(ip("192.0.2.2")));
        assert_eq!(
            IpSet::parse("10.0.0.0/40").unwrap_err(),
            "not an address or CIDR: \"10.0.0.0/40\""
        );
    }
}
