rnn::lstm! {
    pub struct Encoder {
        input: 8,
        layers: 2,
    }
}

fn main() {}
