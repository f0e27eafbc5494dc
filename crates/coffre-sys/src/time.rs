//! The wall clock, as the rest of coffre counts it.

/// Milliseconds since the Unix epoch (0 for a clock set before 1970,
/// `u64::MAX` far past the year 500 million).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whether the kernel counts its clock as synchronized (an NTP daemon
/// such as chrony or systemd-timesyncd disciplines it): `adjtimex` with
/// nothing to change says `TIME_ERROR` when it is not. TOTP codes are
/// checked against this clock.
pub fn clock_synchronized() -> std::io::Result<bool> {
    // SAFETY: an all-zero timex is a valid value of the plain C struct;
    // with `modes` 0 adjtimex only reads the kernel's state into it.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, writable timex for the call's duration.
    let state = unsafe { libc::adjtimex(&mut t) };
    if state < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(state != libc::TIME_ERROR)
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_after_2020_and_moves_forward() {
        let a = super::now_ms();
        assert!(a > 1_577_836_800_000);
        assert!(super::now_ms() >= a);
    }

    #[test]
    fn the_clock_state_can_be_read() {
        // Synchronized or not depends on the host: the call must answer.
        super::clock_synchronized().unwrap();
    }
}
