//! `strict_assert!`: hot-path invariant checks that are `debug_assert!` in normal builds and
//! `assert!` under the `strict-assertions` feature, which CI always enables.

/// Asserts on hot paths: always under `strict-assertions`, else only in debug builds.
#[macro_export]
#[doc(hidden)]
macro_rules! strict_assert {
    ($($arg:tt)*) => {
        if cfg!(any(feature = "strict-assertions", debug_assertions)) {
            assert!($($arg)*);
        }
    };
}
