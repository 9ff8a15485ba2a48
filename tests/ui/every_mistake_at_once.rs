rnn::lstm! {
    pub struct Encoder {
        input: many,
        hiden: 16,
        layers: 0,
        bidirectional: yes,
        layers: 2,
    }
}

fn main() {}
