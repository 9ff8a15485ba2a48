rnn::lstm! {
    pub struct Encoder {
        input: 8,
        hidden: 16,
        layers: true,
        bidirectional: 3,
    }
}

fn main() {}
