rnn::seq2seq! {
    pub struct Translator {
        encodr: gru { vocab: 20, input: 8, hidden: 16 },
        decoder: gru { vocab: 30, input: 8, hidden: 16, head: 30 },
    }
}

fn main() {}
