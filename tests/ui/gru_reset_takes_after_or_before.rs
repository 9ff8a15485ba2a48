rnn::gru! {
    pub struct Decoder {
        input: 8,
        hidden: 16,
        reset: sideways,
    }
}

fn main() {}
