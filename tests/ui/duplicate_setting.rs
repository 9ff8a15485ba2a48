rnn::gru! {
    pub struct Decoder {
        input: 8,
        hidden: 16,
        hidden: 32,
    }
}

fn main() {}
