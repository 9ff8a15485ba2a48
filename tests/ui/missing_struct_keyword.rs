rnn::lstm! {
    pub Encoder { input: 8, hidden: 16 }
}

fn main() {}
