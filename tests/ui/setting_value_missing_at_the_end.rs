rnn::gru! {
    pub struct Decoder {
        input: 8,
        hidden:
    }
}

fn main() {}
