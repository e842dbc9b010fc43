//! TCP sequence numbers: 32-bit values compared modulo 2^32 (RFC 9293 §3.4).

/// A TCP sequence number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Seq(pub u32);

impl Seq {
    /// `self + n` modulo 2^32.
    #[must_use]
    pub const fn add(self, n: u32) -> Self {
        Self(self.0.wrapping_add(n))
    }

    /// Signed distance from `other` to `self`; valid while the two are within 2^31.
    pub const fn distance_from(self, other: Self) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }

    /// `self < other` in sequence space.
    pub const fn lt(self, other: Self) -> bool {
        self.distance_from(other) < 0
    }

    /// `self <= other` in sequence space.
    pub const fn le(self, other: Self) -> bool {
        self.distance_from(other) <= 0
    }

    /// `self > other` in sequence space.
    pub const fn gt(self, other: Self) -> bool {
        self.distance_from(other) > 0
    }

    /// `self >= other` in sequence space.
    pub const fn ge(self, other: Self) -> bool {
        self.distance_from(other) >= 0
    }
}

#[cfg(test)]
mod tests {
    use super::Seq;

    #[test]
    fn comparisons_wrap_around() {
        let near_end = Seq(u32::MAX - 10);
        let wrapped = near_end.add(20);
        assert_eq!(wrapped, Seq(9));
        assert!(near_end.lt(wrapped));
        assert!(wrapped.gt(near_end));
        assert_eq!(wrapped.distance_from(near_end), 20);
        assert_eq!(near_end.distance_from(wrapped), -20);
        assert!(wrapped.le(wrapped) && wrapped.ge(wrapped));
    }
}
