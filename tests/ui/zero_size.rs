rnn::rnn! {
    pub struct Elman {
        input: 0,
        hidden: 16,
    }
}

fn main() {}
