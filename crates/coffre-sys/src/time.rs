//! The wall clock, as the rest of coffre counts it.

/// Milliseconds since the Unix epoch (0 for a clock set before 1970,
/// `u64::MAX` far past the year 500 million).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_after_2020_and_moves_forward() {
        let a = super::now_ms();
        assert!(a > 1_577_836_800_000);
        assert!(super::now_ms() >= a);
    }
}
