rnn::seq2seq! {
    pub struct Translator {
        encoder: gru { vocab: 20, input: 8, hidden: 16 },
    }
}

fn main() {}
