//! What marks an account disabled, read from its attributes.
//!
//! Three marks, whichever the directory has (an attribute that is absent
//! says nothing, so one reading serves OpenLDAP and Active Directory):
//!
//! - `pwdAccountLockedTime` (OpenLDAP's ppolicy overlay): locked when
//!   present and not in the future. `000001010000Z` is the conventional
//!   "locked until an administrator unlocks it".
//! - `userAccountControl` (Active Directory): bit `0x2`, ACCOUNTDISABLE.
//! - `shadowExpire` (RFC 2307 `shadowAccount`): days since 1970-01-01;
//!   expired from that day on, as shadow(5) and `login` read it (values of
//!   0 or less mean "never").
//!
//! A value that cannot be read counts as disabled: a member's access must
//! not depend on this crate understanding an odd spelling.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// An entry's attributes, names in ASCII lower case.
pub type Attributes = BTreeMap<String, Vec<String>>;

/// Why an account counts as disabled.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disabled {
    /// ppolicy's `pwdAccountLockedTime`, as written.
    Locked {
        /// The attribute's value (a generalized time).
        since: String,
    },
    /// Active Directory's `userAccountControl` has ACCOUNTDISABLE (0x2).
    AccountDisabled {
        /// The attribute's value.
        user_account_control: i64,
    },
    /// `shadowExpire` is today or earlier.
    Expired {
        /// The attribute's value, days since 1970-01-01.
        shadow_expire: i64,
    },
    /// A mark this crate could not read, counted as disabled.
    Unreadable {
        /// The attribute.
        attribute: &'static str,
        /// Its value, at most 64 characters of it.
        value: String,
    },
}

impl std::fmt::Display for Disabled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disabled::Locked { since } => write!(
                f,
                "locked by the password policy (pwdAccountLockedTime {since})"
            ),
            Disabled::AccountDisabled {
                user_account_control,
            } => write!(
                f,
                "disabled in Active Directory (userAccountControl {user_account_control:#x} has ACCOUNTDISABLE)"
            ),
            Disabled::Expired { shadow_expire } => {
                write!(f, "expired (shadowExpire {shadow_expire}, days since 1970)")
            }
            Disabled::Unreadable { attribute, value } => {
                write!(
                    f,
                    "{attribute} {value:?} could not be read, so counts as disabled"
                )
            }
        }
    }
}

/// The attributes [`disabled`] reads, to ask for in a search.
pub const DISABLE_ATTRIBUTES: [&str; 3] =
    ["pwdAccountLockedTime", "userAccountControl", "shadowExpire"];

/// The first disabling mark in `attrs` at time `now`, if any.
pub fn disabled(attrs: &Attributes, now: SystemTime) -> Option<Disabled> {
    let now_s = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let unreadable = |attribute: &'static str, value: &str| Disabled::Unreadable {
        attribute,
        value: value.chars().take(64).collect(),
    };
    for v in values(attrs, "pwdaccountlockedtime") {
        match generalized_time(v) {
            Some(t) if t > now_s => {}
            Some(_) => {
                return Some(Disabled::Locked {
                    since: v.to_string(),
                });
            }
            None => return Some(unreadable("pwdAccountLockedTime", v)),
        }
    }
    for v in values(attrs, "useraccountcontrol") {
        match v.trim().parse::<i64>() {
            Ok(uac) if uac & 0x2 != 0 => {
                return Some(Disabled::AccountDisabled {
                    user_account_control: uac,
                });
            }
            Ok(_) => {}
            Err(_) => return Some(unreadable("userAccountControl", v)),
        }
    }
    for v in values(attrs, "shadowexpire") {
        match v.trim().parse::<i64>() {
            Ok(day) if day > 0 && now_s.div_euclid(86_400) >= day => {
                return Some(Disabled::Expired { shadow_expire: day });
            }
            Ok(_) => {}
            Err(_) => return Some(unreadable("shadowExpire", v)),
        }
    }
    None
}

fn values<'a>(attrs: &'a Attributes, name: &str) -> impl Iterator<Item = &'a str> {
    attrs.get(name).into_iter().flatten().map(String::as_str)
}

/// An unsigned 32-bit number attribute (`uidNumber`, `gidNumber`), if
/// present with exactly one readable value.
pub fn number(attrs: &Attributes, name: &str) -> Option<u32> {
    match attrs.get(name).map(Vec::as_slice) {
        Some([v]) => v.trim().parse().ok(),
        _ => None,
    }
}

/// Seconds since 1970 of an RFC 4517 generalized time
/// (`YYYYMMDDHH[MM[SS]][(.|,)fraction](Z|(+|-)HH[MM])`), the fraction
/// dropped; `None` if `s` is not one.
pub fn generalized_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut digits = |n: usize| -> Option<i64> {
        let d = b.get(i..i + n)?;
        if !d.iter().all(u8::is_ascii_digit) {
            return None;
        }
        i += n;
        Some(d.iter().fold(0, |acc, &c| acc * 10 + i64::from(c - b'0')))
    };
    let year = digits(4)?;
    let month = digits(2)?;
    let day = digits(2)?;
    let hour = digits(2)?;
    let (mut minute, mut second) = (0, 0);
    if let Some(m) = digits(2) {
        minute = m;
        if let Some(sec) = digits(2) {
            second = sec;
        }
    }
    if matches!(b.get(i), Some(b'.' | b',')) {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i)? {
        b'Z' => {
            i += 1;
            0
        }
        sign @ (b'+' | b'-') => {
            i += 1;
            let (h, m) = {
                let d = |k: usize| -> Option<i64> {
                    let x = b.get(k..k + 2)?;
                    x.iter()
                        .all(u8::is_ascii_digit)
                        .then(|| i64::from(x[0] - b'0') * 10 + i64::from(x[1] - b'0'))
                };
                let h = d(i)?;
                i += 2;
                let m = if let Some(m) = d(i) {
                    i += 2;
                    m
                } else {
                    0
                };
                (h, m)
            };
            if h > 23 || m > 59 {
                return None;
            }
            let o = h * 3600 + m * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    if i != b.len()
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date: whole 400-year
/// eras (146097 days each) from 0000-03-01, then the day within the era
/// counted from March so that February's leap day falls last.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719468: days from 0000-03-01 to 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn attrs(pairs: &[(&str, &str)]) -> Attributes {
        let mut a = Attributes::new();
        for (k, v) in pairs {
            a.entry(k.to_ascii_lowercase())
                .or_default()
                .push((*v).to_string());
        }
        a
    }

    fn at(s: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap())
    }

    #[test]
    fn generalized_times() {
        assert_eq!(generalized_time("19700101000000Z"), Some(0));
        assert_eq!(generalized_time("1970010100Z"), Some(0));
        assert_eq!(generalized_time("20240229120000Z"), Some(1_709_208_000));
        assert_eq!(generalized_time("20240229120000.123Z"), Some(1_709_208_000));
        assert_eq!(generalized_time("20240229140000+0200"), Some(1_709_208_000));
        assert_eq!(generalized_time("20240229100000-02"), Some(1_709_208_000));
        assert_eq!(generalized_time("000001010000Z"), Some(-62_167_219_200));
        for bad in [
            "",
            "2024",
            "20240230120000Z",
            "20230229120000Z",
            "20241301000000Z",
            "2024010124Z",
            "20240101000000",
            "20240101000000Q",
            "20240101000000Zx",
            "20240101000000.Z",
            "20240101000000+2400",
            "2024010100 0000Z",
            "+0240101000000Z",
        ] {
            assert_eq!(generalized_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2026, 12, 1), 20_788);
    }

    #[test]
    fn ppolicy_lock() {
        let now = at(1_800_000_000);
        assert_eq!(disabled(&attrs(&[]), now), None);
        let locked = attrs(&[("pwdAccountLockedTime", "000001010000Z")]);
        assert!(matches!(
            disabled(&locked, now),
            Some(Disabled::Locked { .. })
        ));
        let past = attrs(&[("pwdAccountLockedTime", "20200101000000Z")]);
        assert!(matches!(
            disabled(&past, now),
            Some(Disabled::Locked { .. })
        ));
        let future = attrs(&[("pwdAccountLockedTime", "21000101000000Z")]);
        assert_eq!(disabled(&future, now), None);
        let odd = attrs(&[("pwdAccountLockedTime", "yesterday")]);
        assert!(matches!(
            disabled(&odd, now),
            Some(Disabled::Unreadable {
                attribute: "pwdAccountLockedTime",
                ..
            })
        ));
    }

    #[test]
    fn active_directory_account_control() {
        let now = at(1_800_000_000);
        // 512 NORMAL_ACCOUNT, 514 = 512 | ACCOUNTDISABLE, 66048 = 512 | DONT_EXPIRE_PASSWORD.
        assert_eq!(
            disabled(&attrs(&[("userAccountControl", "512")]), now),
            None
        );
        assert_eq!(
            disabled(&attrs(&[("userAccountControl", "66048")]), now),
            None
        );
        assert_eq!(
            disabled(&attrs(&[("userAccountControl", "514")]), now),
            Some(Disabled::AccountDisabled {
                user_account_control: 514
            })
        );
        assert_eq!(
            disabled(&attrs(&[("userAccountControl", "66050")]), now),
            Some(Disabled::AccountDisabled {
                user_account_control: 66050
            })
        );
        // LOCKOUT (0x10) alone is not ACCOUNTDISABLE.
        assert_eq!(
            disabled(&attrs(&[("userAccountControl", "528")]), now),
            None
        );
        assert!(matches!(
            disabled(&attrs(&[("userAccountControl", "0x202")]), now),
            Some(Disabled::Unreadable { .. })
        ));
    }

    #[test]
    fn shadow_expiry() {
        let day = 20_000;
        let noon = at(day * 86_400 + 43_200);
        let e = |v: &str| disabled(&attrs(&[("shadowExpire", v)]), noon);
        assert_eq!(e("-1"), None);
        assert_eq!(e("0"), None);
        assert_eq!(e("20001"), None);
        assert_eq!(
            e("20000"),
            Some(Disabled::Expired {
                shadow_expire: 20_000
            })
        );
        assert_eq!(e("1"), Some(Disabled::Expired { shadow_expire: 1 }));
        assert!(matches!(e("soon"), Some(Disabled::Unreadable { .. })));
    }

    #[test]
    fn numbers() {
        assert_eq!(
            number(&attrs(&[("uidnumber", "70000")]), "uidnumber"),
            Some(70_000)
        );
        assert_eq!(number(&attrs(&[("uidnumber", "-1")]), "uidnumber"), None);
        assert_eq!(
            number(
                &attrs(&[("uidnumber", "1"), ("uidnumber", "2")]),
                "uidnumber"
            ),
            None
        );
        assert_eq!(number(&attrs(&[]), "uidnumber"), None);
    }

    proptest! {
        #[test]
        fn generalized_time_round_trips(secs in -62_167_219_200i64..253_402_300_800i64) {
            // Format with our own calendar arithmetic inverted by search.
            let days = secs.div_euclid(86_400);
            let rem = secs.rem_euclid(86_400);
            let mut year = 1970 + days.div_euclid(366) - 1;
            while days_from_civil(year + 1, 1, 1) <= days { year += 1; }
            while days_from_civil(year, 1, 1) > days { year -= 1; }
            let mut month = 1;
            while month < 12 && days_from_civil(year, month + 1, 1) <= days { month += 1; }
            let day = days - days_from_civil(year, month, 1) + 1;
            let s = format!("{year:04}{month:02}{day:02}{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60);
            prop_assert_eq!(generalized_time(&s), Some(secs));
        }

        #[test]
        fn account_control_bit_two_decides(uac in any::<i32>()) {
            let a = attrs(&[("userAccountControl", &uac.to_string())]);
            let d = disabled(&a, at(0));
            prop_assert_eq!(d.is_some(), uac & 2 != 0);
        }

        #[test]
        fn no_panic_on_any_value(v in "\\PC{0,30}") {
            let a = attrs(&[("pwdAccountLockedTime", &v), ("userAccountControl", &v), ("shadowExpire", &v)]);
            let _ = disabled(&a, SystemTime::now());
            let _ = generalized_time(&v);
        }
    }
}
