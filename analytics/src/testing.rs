//! What the crate's tests share.

/// Numbers below `n`, from a small linear congruential generator seeded with `seed`: a
/// test's random cases are the same on every run.
pub(crate) fn numbers(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut state = seed;
    move |n| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    }
}
