rnn::rnn! {
    struct Cell {
        input: 3,
        hidden: 4,
        param W: [hidden, input],
        param U: [hidden, input],
        state h,
        h = tanh(W @ x + U @ h),
    }
}

fn main() {}
