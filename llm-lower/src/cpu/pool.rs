//! The recycled memory of a program's values: float buffers, shape vectors and the
//! reference-counted boxes values live in. A value a program releases gives all three
//! back, and the next kernel output takes them, so that a decode step in steady state
//! calls the allocator for none of them.

use std::{cell::RefCell, mem, rc::Rc};

use llm_ir::{
    dtype::DType,
    interp::{Data, Tensor, Value},
};

/// Memory of released values, reused for kernel outputs.
#[derive(Default)]
pub struct BufferPool {
    /// Float buffers, by capacity (ascending).
    floats: RefCell<Vec<(usize, Vec<Vec<f32>>)>>,
    /// Shape vectors (empty, with their capacity).
    shapes: RefCell<Vec<Vec<usize>>>,
    /// Boxes of released values, each holding an empty tensor that owns no memory.
    shells: RefCell<Vec<Rc<Value>>>,
}

/// Pushes `item` unless `pool` already keeps [`BufferPool::KEEP`] items.
fn keep<T>(pool: &RefCell<Vec<T>>, item: T) {
    let mut pool = pool.borrow_mut();
    if pool.len() < BufferPool::KEEP {
        pool.push(item);
    }
}

/// A tensor that owns no memory (what a pooled box holds).
fn empty_tensor() -> Tensor {
    Tensor {
        shape: Vec::new(),
        dtype: DType::F32,
        data: Data::Float(Vec::new()),
    }
}

impl BufferPool {
    /// Items of each kind kept at most.
    const KEEP: usize = 64;

    /// Dims a new shape vector has room for (a kernel result has at most 4, and a
    /// gather adds one to its ids' shape).
    const SHAPE_CAPACITY: usize = 5;

    /// A buffer of `n` zeros.
    pub fn zeroed(&self, n: usize) -> Vec<f32> {
        let mut v = self.take(n);
        v.clear();
        v.resize(n, 0.0);
        v
    }

    /// A buffer of `n` floats for a kernel that writes every one of them: it holds what
    /// an earlier output left (zeros where it was shorter), so it is not cleared first.
    pub fn for_overwrite(&self, n: usize) -> Vec<f32> {
        let mut v = self.take(n);
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        v
    }

    /// The smallest pooled buffer that holds `n` floats, or a new one. (A step in steady
    /// state asks for the sizes it gave back, so the first bucket that fits is usually of
    /// exactly `n`.)
    fn take(&self, n: usize) -> Vec<f32> {
        let mut pool = self.floats.borrow_mut();
        pool.iter_mut()
            .filter(|(capacity, _)| *capacity >= n)
            .find_map(|(_, buffers)| buffers.pop())
            .unwrap_or_else(|| Vec::with_capacity(n))
    }

    /// Takes back a float buffer.
    fn recycle_floats(&self, v: Vec<f32>) {
        let mut pool = self.floats.borrow_mut();
        let capacity = v.capacity();
        match pool.binary_search_by_key(&capacity, |(c, _)| *c) {
            Ok(i) if pool[i].1.len() < Self::KEEP => pool[i].1.push(v),
            Err(i) if capacity > 0 && pool.len() < Self::KEEP => {
                pool.insert(i, (capacity, vec![v]))
            }
            _ => {}
        }
    }

    /// A shape vector holding `dims` (with room for one more dim).
    pub fn shape(&self, dims: &[usize]) -> Vec<usize> {
        let mut shape = self
            .shapes
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(Self::SHAPE_CAPACITY));
        shape.extend_from_slice(dims);
        shape
    }

    /// Takes back a shape vector.
    pub fn recycle_shape(&self, mut shape: Vec<usize>) {
        shape.clear();
        keep(&self.shapes, shape);
    }

    /// `value` in a reference-counted box (a pooled one for a tensor).
    pub fn wrap(&self, value: Value) -> Rc<Value> {
        match value {
            Value::Tensor(t) => self.wrap_tensor(t),
            other => Rc::new(other),
        }
    }

    /// `t` in a reference-counted box, a pooled one where there is one.
    pub fn wrap_tensor(&self, t: Tensor) -> Rc<Value> {
        let Some(mut shell) = self.shells.borrow_mut().pop() else {
            return Rc::new(Value::Tensor(t));
        };
        match Rc::get_mut(&mut shell) {
            // The box held an empty tensor: replacing it frees nothing.
            Some(Value::Tensor(slot)) => {
                *slot = t;
                shell
            }
            _ => Rc::new(Value::Tensor(t)),
        }
    }

    /// The tensor of `value`, taken out of its box (which the pool keeps) when nothing
    /// else holds it, copied otherwise.
    pub fn take_tensor(&self, mut value: Rc<Value>) -> Result<Tensor, String> {
        match Rc::get_mut(&mut value) {
            Some(Value::Tensor(t)) => {
                let t = mem::replace(t, empty_tensor());
                keep(&self.shells, value);
                Ok(t)
            }
            _ => value.tensor().cloned(),
        }
    }

    /// Takes back the memory of `value` when nothing else holds it.
    pub fn recycle(&self, mut value: Rc<Value>) {
        let Some(Value::Tensor(t)) = Rc::get_mut(&mut value) else {
            return;
        };
        self.recycle_shape(mem::take(&mut t.shape));
        if let Data::Float(v) = mem::replace(&mut t.data, Data::Float(Vec::new())) {
            self.recycle_floats(v);
        }
        keep(&self.shells, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: Vec<usize>, values: Vec<f32>) -> Value {
        Value::Tensor(Tensor::from_f32(shape, DType::F32, values))
    }

    #[test]
    fn released_values_give_back_their_memory() {
        let pool = BufferPool::default();
        let value = pool.wrap(tensor(vec![2, 3], vec![1.0; 6]));
        let (box_at, data_at) = (
            Rc::as_ptr(&value),
            value.tensor().unwrap().floats().unwrap().as_ptr(),
        );
        pool.recycle(value);
        let data = pool.zeroed(4);
        assert_eq!(data.as_ptr(), data_at);
        assert_eq!(data, vec![0.0; 4]);
        let shape = pool.shape(&[4]);
        assert_eq!(shape, vec![4]);
        let again = pool.wrap(tensor(shape, data));
        assert_eq!(Rc::as_ptr(&again), box_at);
        assert_eq!(again.tensor().unwrap().shape, vec![4]);
    }

    #[test]
    fn shared_values_stay_whole() {
        let pool = BufferPool::default();
        let value = pool.wrap(tensor(vec![2], vec![1.0, 2.0]));
        let other = Rc::clone(&value);
        pool.recycle(value);
        assert_eq!(other.tensor().unwrap().floats().unwrap(), &[1.0, 2.0]);
        let taken = pool.take_tensor(Rc::clone(&other)).unwrap();
        assert_eq!(taken.floats().unwrap(), &[1.0, 2.0]);
        assert_eq!(other.tensor().unwrap().floats().unwrap(), &[1.0, 2.0]);
    }
}
