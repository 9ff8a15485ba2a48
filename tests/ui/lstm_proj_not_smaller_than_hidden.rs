rnn::lstm! {
    pub struct Encoder {
        input: 8,
        hidden: 16,
        proj: 16,
    }
}

fn main() {}
