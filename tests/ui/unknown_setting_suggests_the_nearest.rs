rnn::lstm! {
    pub struct Encoder {
        input: 8,
        hiden: 16,
    }
}

fn main() {}
