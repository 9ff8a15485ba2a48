//! A per-thread pool of `f32` buffers: what a finished kernel gives back, the next one reuses.
//! Shared by the code the macros emit (`rnn::rt`) and the JIT.
//!
//! A whole sequence's buffers are large (W1's input projection is 64 MiB): fresh ones come from
//! the operating system zeroed page by page on first touch, which cost a tenth of W1's time
//! (measured with `perf`); a reused one is only filled, or not even that ([`scratch`]).

std::thread_local! {
    /// Buffers a finished kernel gave back ([`recycle`]), reused by [`zeros`].
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most elements the pool of one thread keeps (256 MiB of `f32`).
const POOL_LIMIT: usize = 64 << 20;

/// The smallest buffer of the pool that holds `n` elements and is at most about twice that,
/// taken out of it. A much larger one stays for a request of its size: handed to a small
/// request, it would leave the pool when that buffer is given back to a full pool, and freeing
/// 64 MiB of touched pages costs milliseconds (measured: a 60 µs run took 2.5 ms after W2 had
/// filled the pool).
fn reuse(n: usize) -> Option<Vec<f32>> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n && b.capacity() <= n.saturating_mul(2).max(4096))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i))
    })
}

/// `n` zeros, in a buffer a finished kernel of this thread gave back when one is large enough.
///
/// A whole sequence's buffers are large (W1's input projection is 64 MiB): fresh ones come from
/// the operating system zeroed page by page on first touch, which cost a tenth of W1's time
/// (measured with `perf`); a reused one is only filled.
pub fn zeros(n: usize) -> Vec<f32> {
    match reuse(n) {
        Some(mut b) => {
            b.clear();
            b.resize(n, 0.0);
            b
        }
        None => vec![0.0; n],
    }
}

/// `n` elements whose values are unspecified (a buffer [`zeros`] would reuse, not filled): for a
/// buffer every element of which is written before it is read (a product's result). W1's
/// input projection (64 MiB) is then not zeroed at each call.
pub fn scratch(n: usize) -> Vec<f32> {
    match reuse(n) {
        Some(mut b) => {
            // Only elements past the old length are filled.
            b.resize(n, 0.0);
            b
        }
        None => vec![0.0; n],
    }
}

/// Elements of the buffers this thread keeps for reuse.
pub fn held() -> usize {
    POOL.with(|pool| pool.borrow().iter().map(Vec::capacity).sum())
}

/// Frees the buffers this thread keeps for reuse (up to 256 MiB after a large run).
pub fn release_buffers() {
    POOL.with(|pool| pool.borrow_mut().clear());
}

/// Gives buffers back for [`zeros`] to reuse on this thread (up to a bound; the rest are freed).
pub fn recycle(buffers: impl IntoIterator<Item = Vec<f32>>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let mut held: usize = pool.iter().map(Vec::capacity).sum();
        for b in buffers {
            if b.capacity() >= 1024 && held + b.capacity() <= POOL_LIMIT {
                held += b.capacity();
                pool.push(b);
            }
        }
    });
}
