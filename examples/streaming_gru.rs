//! Streaming: a GRU declared with `rnn::gru!`, fed one input at a time, as a live audio or
//! sensor pipeline would feed it. `step` reads one frame and updates the state in place; it
//! allocates nothing and needs only `core`, so the same code runs on a microcontroller.
//!
//! Run with `cargo run --release --example streaming_gru`.

use std::time::Instant;

rnn::gru! {
    /// 64 features per frame in, 128 hidden features out (the W3 workload's sizes).
    pub struct Detector { input: 64, hidden: 128 }
}

fn main() {
    // PyTorch's initialisation from a seed; a trained model would come from
    // `Detector::from_safetensors(&std::fs::read("detector.safetensors")?)`.
    let model = Detector::init(42);
    let mut state = DetectorState::ZERO;

    // A synthetic signal: each frame a slowly turning sinusoid over the 64 features.
    let frame = |t: usize| -> [f32; 64] {
        std::array::from_fn(|i| ((t as f32) * 0.05 + i as f32 * 0.1).sin())
    };

    let start = Instant::now();
    let frames = 1000;
    let mut h = [0.0; 128];
    for t in 0..frames {
        h = model.step(&frame(t), &mut state);
        if t % 200 == 0 {
            let norm = h.iter().map(|v| v * v).sum::<f32>().sqrt();
            println!("frame {t:4}: |h| = {norm:.4}, h[0..4] = {:?}", &h[..4]);
        }
    }
    let per_step = start.elapsed().as_secs_f64() / frames as f64;
    println!(
        "{frames} steps, {:.2} µs per step (the frame synthesis included), last |h| = {:.4}",
        per_step * 1e6,
        h.iter().map(|v| v * v).sum::<f32>().sqrt()
    );

    // A new utterance starts from a zero state again.
    state = DetectorState::default();
    let first = model.step(&frame(0), &mut state);
    println!("restarted: h[0..4] = {:?}", &first[..4]);
}
