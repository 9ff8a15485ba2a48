//! The streaming `step` allocates nothing: the interpreter's after its first call, the emitted
//! models' ever (on both SIMD paths). A global allocator counts the allocations made by this
//! test's thread while it steps.
//!
//! One test in its own binary, so that no other test's allocations are counted.

use rnn::{CellKind, Exec, ModelSpec, Program, Weights, parse_str};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator; the thread-locals are const-initialised
// `Cell`s without destructors, so touching them never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    COUNT.with(|c| c.get())
}

#[test]
fn streaming_step_allocates_nothing_after_the_first_call() {
    let mut specs = vec![
        ModelSpec::new(CellKind::Gru, 64, 128),
        ModelSpec::new(CellKind::Lstm, 256, 256),
    ];
    let mut stacked = ModelSpec::new(CellKind::Lstm, 5, 7);
    stacked.num_layers = 3;
    stacked.proj_size = 3;
    specs.push(stacked);
    specs.push(
        parse_str(
            "cell Peephole {
                input: 3, hidden: 4,
                param W: [hidden, input], param U: [hidden, hidden], param b: [hidden],
                param p_i: [hidden], param p_f: [hidden],
                state h, state c,
                i = sigmoid(W @ x + U @ h + b),
                c = i * c + p_i * c + p_f * h,
                h = tanh(c) * i,
                output h
            }",
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    for spec in specs {
        let program = Program::compile(&spec).unwrap();
        let bound = program
            .bind::<f32>(&Weights::init(&program, 1).unwrap())
            .unwrap();
        for batch in [1, 3] {
            let mut stream = bound.stream(batch, Exec::default()).unwrap();
            let mut state = stream.zero_state();
            let xs: Vec<Vec<f32>> = (0..20)
                .map(|t| {
                    (0..batch * spec.input_size)
                        .map(|i| ((t * 31 + i * 7) % 17) as f32 / 17.0 - 0.5)
                        .collect()
                })
                .collect();
            stream.step(&mut state, &xs[0]).unwrap();
            let n = allocations(|| {
                for x in &xs[1..] {
                    stream.step(&mut state, x).unwrap();
                }
            });
            assert_eq!(
                n,
                0,
                "{} with batch {batch}: {n} allocations in 19 steps",
                spec.cell.name()
            );
        }
    }
}

rnn::gru! { struct StreamGru { input: 64, hidden: 128 } }
rnn::lstm! { struct StreamLstm { input: 5, hidden: 7, layers: 3, proj: 3 } }
rnn::rnn! { struct StreamPeephole {
    input: 3, hidden: 4,
    param W: [hidden, input], param U: [hidden, hidden], param b: [hidden],
    param p_i: [hidden], param p_f: [hidden],
    state h, state c,
    i = sigmoid(W @ x + U @ h + b),
    c = i * c + p_i * c + p_f * h,
    h = tanh(c) * i,
    output h
} }

#[test]
fn an_emitted_step_allocates_nothing_on_any_path() {
    let gru = StreamGru::init(1);
    let lstm = StreamLstm::init(2);
    let peephole = StreamPeephole::init(3);
    for isa in [
        rnn::rt::Isa::Portable,
        rnn::rt::Isa::Avx2,
        rnn::rt::Isa::Avx512,
    ] {
        let ran = rnn::rt::with_isa(isa, || {
            // Twenty steps of `step(x)` with `x` rising from 0: the allocations they make.
            let no_allocations = |what: &str, step: &mut dyn FnMut(f32)| {
                let n = allocations(|| {
                    for t in 0..20 {
                        step(t as f32 / 20.0);
                    }
                });
                assert_eq!(n, 0, "{what} on {isa:?}: {n} allocations in 20 steps");
            };
            let mut s = StreamGruState::ZERO;
            no_allocations("GRU", &mut |x| {
                std::hint::black_box(gru.step(&[x; 64], &mut s));
            });
            let mut s = StreamLstmState::ZERO;
            no_allocations("stacked LSTM", &mut |x| {
                std::hint::black_box(lstm.step(&[x; 5], &mut s));
            });
            let (mut s, mut y) = (StreamPeepholeState::ZERO, [0.0; 4]);
            no_allocations("custom cell", &mut |x| {
                peephole.step_slices(&[x; 3], &mut s, &mut y).unwrap();
            });
        });
        if ran.is_none() {
            eprintln!("this CPU has no {isa:?}: its path is not checked");
        }
    }
}
