rnn::seq2seq! {
    pub struct Translator {
        encoder: gru { vocab: 20, input: 8, hidden: 16 },
        decoder: gru { vocab: 30, input: 8, hidden: 16, head: 30, attention: general, attention_units: 8 },
    }
}

fn main() {}
