//! MAC addresses: the key of every machine.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet MAC address. Displayed in the normalised form `aa:bb:cc:dd:ee:ff`,
/// which is how it is stored and shown everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

/// The reason a string is not a MAC address.
#[derive(Debug, thiserror::Error)]
#[error("{input:?} is not a MAC address: expected six hex octets such as aa:bb:cc:dd:ee:ff, aa-bb-cc-dd-ee-ff, aabb.ccdd.eeff or aabbccddeeff")]
pub struct MacError {
    input: String,
}

impl FromStr for Mac {
    type Err = MacError;

    /// Accepts the colon (`aa:bb:..`), hyphen (`aa-bb-..`, iPXE's `${mac:hexhyp}`), Cisco dot
    /// (`aabb.ccdd.eeff`) and bare (`aabbccddeeff`) forms, in either case. Separators must be
    /// used consistently, so `aa:bb-cc...` is refused rather than guessed at.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacError {
            input: s.to_string(),
        };
        let t = s.trim();
        let hex: String = if t.len() == 17 {
            let sep = t.as_bytes()[2];
            if sep != b':' && sep != b'-' {
                return Err(err());
            }
            for (i, b) in t.bytes().enumerate() {
                if i % 3 == 2 && b != sep {
                    return Err(err());
                }
            }
            t.split(sep as char).collect()
        } else if t.len() == 14 {
            let b = t.as_bytes();
            if b[4] != b'.' || b[9] != b'.' {
                return Err(err());
            }
            t.split('.').collect()
        } else if t.len() == 12 {
            t.to_string()
        } else {
            return Err(err());
        };
        if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut out = [0u8; 6];
        hex::decode_to_slice(&hex, &mut out).map_err(|_| err())?;
        Ok(Mac(out))
    }
}

impl Mac {
    /// The hyphenated form iPXE prints for `${mac:hexhyp}`.
    pub fn hyphenated(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_common_form() {
        for s in [
            "52:54:00:AB:cd:01",
            "52-54-00-ab-cd-01",
            "5254.00ab.cd01",
            "525400abcd01",
            " 52:54:00:ab:cd:01\n",
        ] {
            assert_eq!(
                s.parse::<Mac>().unwrap().to_string(),
                "52:54:00:ab:cd:01",
                "{s}"
            );
        }
    }

    #[test]
    fn refuses_malformed() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54-00:ab:cd:01",
            "52:54:00:ab:cd:0g",
            "52:54:00:ab:cd:01:02",
            "5254.00ab-cd01",
            "52 54 00 ab cd 01",
            "525400abcd0",
            "+25400abcd01",
        ] {
            assert!(s.parse::<Mac>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn hyphenated_matches_ipxe_hexhyp() {
        let m: Mac = "52:54:00:ab:cd:01".parse().unwrap();
        assert_eq!(m.hyphenated(), "52-54-00-ab-cd-01");
    }
}
