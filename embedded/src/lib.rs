//! An embedded keyword spotter's recurrent core, as a `#![no_std]` crate: it depends on the `rnn`
//! facade with default features off (no `std`, no heap, no interpreter), declares a GRU with the
//! macro and runs it one step per audio frame.
//!
//! `.ci/run` builds it (`cargo build -p rnn-embedded`), which proves that the emitted `step` and
//! state use only `core`. The weights live in a `static`, as firmware would keep them in flash;
//! `load` fills them from a flat little-endian array (what a build script would embed).

#![no_std]
#![forbid(unsafe_code)]

rnn::gru! {
    /// The spotter's GRU: 13 MFCC features in, 16 hidden features out.
    pub struct Spotter { input: 13, hidden: 16 }
}

/// The weights in PyTorch's `state_dict` order, every parameter's elements row-major.
pub fn load(model: &mut Spotter, flat: &[f32]) -> Result<(), usize> {
    let mut at = 0;
    for (_, data) in model.parameters_mut() {
        let end = at + data.len();
        let src = flat.get(at..end).ok_or(flat.len())?;
        data.copy_from_slice(src);
        at = end;
    }
    if at == flat.len() {
        Ok(())
    } else {
        Err(flat.len())
    }
}

/// Runs `frames` through the model from a zero state and returns the last hidden state.
pub fn spot(model: &Spotter, frames: &[[f32; 13]]) -> [f32; 16] {
    let mut state = SpotterState::ZERO;
    let mut h = [0.0; 16];
    for frame in frames {
        h = model.step(frame, &mut state);
    }
    h
}

/// The model with every weight zero, as a `static` would hold it before `load`.
pub static ZERO: Spotter = Spotter::ZERO;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_model_stays_at_zero_and_a_loaded_one_moves() {
        assert_eq!(spot(&ZERO, &[[1.0; 13]; 4]), [0.0; 16]);
        let mut model = Spotter::ZERO;
        let n = Spotter::PARAMETERS;
        let flat: [f32; 3 * 16 * (13 + 16) + 6 * 16] =
            core::array::from_fn(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.5);
        assert_eq!(flat.len(), n);
        load(&mut model, &flat).unwrap();
        let h = spot(&model, &[[0.5; 13]; 4]);
        assert!(h.iter().any(|&v| v != 0.0));
        assert!(h.iter().all(|v| v.abs() < 1.0));
        assert_eq!(load(&mut model, &flat[..10]), Err(10));
    }
}
