rnn::seq2seq! {
    pub struct Translator {
        encoder: lstm { vocab: 20, input: 8, hidden: 16, layers: 2, batch_first: true },
        decoder: lstm { vocab: 30, input: 8, hidden: 16, head: 30, batch_first: true },
    }
}

fn main() {}
