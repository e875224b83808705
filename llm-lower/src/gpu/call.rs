//! One call of a GPU program: value slots (on the host, on the device, or a KV pool),
//! shader dispatches recorded into one compute pass, host checks of every index a shader
//! follows, and the host fallback for ops without a GPU kernel.
//!
//! Indices the shaders follow (token ids, KV slots, block tables, context lengths) are
//! checked on the host before anything is dispatched: out-of-range storage accesses on a
//! GPU do not fault, they read or write the wrong place.

use std::{collections::HashSet, rc::Rc, sync::Arc};

use llm_ir::{
    dtype::DType,
    interp::{
        self, KvCache, QTensor, Sharded, Tensor, Value, WeightStore,
        eval::{
            attention::{RopeAngles, for_each_paged_row, slot_of},
            resolve_shape,
            shape::{permute_layout, slice_layout},
            shard::product_shape,
        },
        quant::storage_bytes,
    },
};
use pliron::context::Context;

use super::{
    device::Gpu,
    pool::{Pool, read_pool},
    program::{PARAM_STRIDE, Program, Rows, Step},
    tensor::{DeviceTensor, Elem, device_bytes, row_bytes, tensor_bytes},
    wgsl::{
        CONTRACTION_ROWS, GroupQuantize, STRIDED_ARGS, STRIDED_RANK, TILE, WORKGROUP,
        blocks_per_invocation, kv_append_values_per_invocation,
    },
};
use crate::{
    kernel::{
        AttentionSource, BroadcastLayout, Contraction, Kernel, KvRounding, MatmulDims, Movement,
        WeightFormat, batched_matmul_dims, broadcast_layout, contiguous_attention_shape,
        rope_angles, whole_rows,
    },
    selection::weight_operand,
};

mod mesh;

/// What identifies a rope table within a call: the angles (theta, scaling, rotated values
/// per head and frequency factors) and the slot of the positions.
type RopeKey = (RopeAngles, usize);

/// How a device holds a tensor of `dtype` (every element in 32 bits).
fn elem_of(dtype: DType) -> Elem {
    match dtype {
        DType::F32 => Elem::F32,
        DType::F16 | DType::BF16 => Elem::Narrow(dtype),
        int => Elem::I32(int),
    }
}

/// How a device holds a contraction's weight of `format`: f32 rows (a `[k, n]` one was
/// transposed at upload), or the packed format's words.
fn weight_elem(format: WeightFormat) -> Elem {
    match format {
        WeightFormat::F32 | WeightFormat::F32Panels | WeightFormat::F32KN => Elem::F32,
        quantized => Elem::Packed(quantized),
    }
}

// A strided body's dims and strides fill at most one parameter block.
const _: () = assert!(STRIDED_RANK * (1 + STRIDED_ARGS) * 4 <= PARAM_STRIDE as usize);

/// The strided-copy shader's parameters for the elements `first + Σ c[d] * strides[d]`
/// over the indices `c` of `size`: the output dims padded to 4, their strides, and
/// `first`. Dims of 1 are dropped and a dim merges into the one before it where the two
/// read one run; `None` when more than four dims remain.
fn strided_layout(size: &[usize], strides: &[usize], first: usize) -> Option<[usize; 9]> {
    let mut kept: Vec<(usize, usize)> = Vec::new();
    for (&n, &stride) in size.iter().zip(strides).filter(|(n, _)| **n != 1) {
        match kept.last_mut() {
            Some(outer) if outer.1 == stride * n => *outer = (outer.0 * n, stride),
            _ => kept.push((n, stride)),
        }
    }
    if kept.len() > 4 {
        return None;
    }
    let mut words = [1, 1, 1, 1, 0, 0, 0, 0, first];
    let pad = 4 - kept.len();
    for (i, (n, stride)) in kept.into_iter().enumerate() {
        words[pad + i] = n;
        words[4 + pad + i] = stride;
    }
    Some(words)
}

/// Invocations per workgroup, as a count.
const WG: usize = WORKGROUP as usize;

/// What a value slot holds during a call.
#[derive(Clone)]
pub(super) enum Slot {
    /// A host value, with its device copy once a shader needed it.
    Host(Rc<Value>, Option<DeviceTensor>),
    /// A value only the device has.
    Device(DeviceTensor),
    /// A KV pool on the device.
    Pool(Arc<Pool>),
    /// A sharded value whose shards the device has (one tensor per mesh device).
    Sharded(Rc<Sharded<DeviceTensor>>),
}

/// One recorded dispatch.
struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    grid: [u32; 2],
}

/// The state of one call.
pub(super) struct Call<'a> {
    program: &'a Program,
    env: Vec<Option<Slot>>,
    pending: Vec<Dispatch>,
    /// Parameter blocks of the dispatches recorded so far, [`PARAM_STRIDE`] apart.
    params: Vec<u8>,
    /// (tables, lens, tokens, window) combinations already checked.
    validated: HashSet<(usize, usize, usize, usize)>,
    /// The rope tables uploaded this call, by theta and scaling bits, rotated values and
    /// the positions' slot.
    ropes: Vec<(RopeKey, (wgpu::Buffer, wgpu::Buffer))>,
    /// Whether a shader that can fault was recorded (the fault word was then zeroed).
    faults: bool,
}

impl Call<'_> {
    /// A call of `program` with every slot empty.
    pub fn new(program: &Program) -> Call<'_> {
        Call {
            program,
            env: vec![None; program.slots],
            pending: Vec::new(),
            params: Vec::new(),
            validated: HashSet::new(),
            ropes: Vec::new(),
            faults: false,
        }
    }

    /// Gives slot `s` its value.
    pub fn set(&mut self, s: usize, value: Slot) {
        self.env[s] = Some(value);
    }

    fn gpu(&self) -> &Gpu {
        &self.program.gpu
    }

    fn slot(&self, s: usize) -> Result<&Slot, String> {
        self.env[s]
            .as_ref()
            .ok_or_else(|| "an operand has no value".to_string())
    }

    /// The host value of slot `s`, reading it back from the device when only the device
    /// has it.
    fn host(&mut self, s: usize) -> Result<Rc<Value>, String> {
        match self.slot(s)?.clone() {
            Slot::Host(v, _) => Ok(v),
            Slot::Device(t) => {
                let value = Rc::new(self.read_tensor(&t)?);
                self.env[s] = Some(Slot::Host(Rc::clone(&value), Some(t)));
                Ok(value)
            }
            Slot::Pool(pool) => {
                let value = Rc::new(Value::Cache(self.read_pool(&pool)?));
                Ok(value)
            }
            Slot::Sharded(x) => {
                let shards = x
                    .shards
                    .iter()
                    .map(|t| match self.read_tensor(t)? {
                        Value::Tensor(t) => Ok(t),
                        other => Err(format!("a shard read back as {}", other.kind())),
                    })
                    .collect::<Result<_, String>>()?;
                Ok(Rc::new(Value::Sharded(x.with_shards(shards))))
            }
        }
    }

    /// The device tensor of slot `s`, uploading a host value on first use.
    fn device(&mut self, s: usize) -> Result<DeviceTensor, String> {
        match self.slot(s)?.clone() {
            Slot::Device(t) | Slot::Host(_, Some(t)) => Ok(t),
            Slot::Host(v, None) => {
                let t = self.upload((s, 0), device_bytes(&v, false, false)?)?;
                self.env[s] = Some(Slot::Host(v, Some(t.clone())));
                Ok(t)
            }
            Slot::Pool(_) => Err("expected a tensor, found a KV cache".into()),
            Slot::Sharded(_) => Err("expected a tensor, found a sharded tensor".into()),
        }
    }

    /// The device shards of slot `s`, uploading a host sharded value on first use.
    fn sharded(&mut self, s: usize) -> Result<Rc<Sharded<DeviceTensor>>, String> {
        match self.slot(s)?.clone() {
            Slot::Sharded(x) => Ok(x),
            Slot::Host(v, _) => {
                let x = v.sharded()?;
                let shards = x
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(d, t)| self.upload((s, d), tensor_bytes(t, false, false)?))
                    .collect::<Result<_, _>>()?;
                let x = Rc::new(x.with_shards(shards));
                self.env[s] = Some(Slot::Sharded(Rc::clone(&x)));
                Ok(x)
            }
            Slot::Device(_) => Err("expected a sharded tensor, found a tensor".into()),
            Slot::Pool(_) => Err("expected a sharded tensor, found a KV cache".into()),
        }
    }

    /// Writes a host value's device bytes (`device_bytes`, `tensor_bytes`) to the upload
    /// buffer of `key` (slot and shard), growing it when they do not fit.
    fn upload(
        &mut self,
        key: (usize, usize),
        (shape, elem, bytes): (Vec<usize>, Elem, Vec<u8>),
    ) -> Result<DeviceTensor, String> {
        if bytes.len() as u64 > self.gpu().limits().max_binding_bytes {
            return Err(format!(
                "a value of {} bytes exceeds the device's binding limit",
                bytes.len()
            ));
        }
        let buffer = {
            let mut buffers = self.program.buffers.borrow_mut();
            let buffer = buffers
                .uploads
                .entry(key)
                .or_insert_with(|| self.program.gpu.storage("upload", bytes.len() as u64));
            if buffer.size() < bytes.len() as u64 {
                *buffer = self.program.gpu.storage("upload", bytes.len() as u64);
            }
            buffer.clone()
        };
        self.gpu().write(&buffer, 0, &bytes);
        Ok(DeviceTensor::unsplit(shape, elem, buffer))
    }

    /// The device pool of slot `s`, uploading a host cache (a reference op's result).
    fn pool(&mut self, s: usize) -> Result<Arc<Pool>, String> {
        match self.slot(s)?.clone() {
            Slot::Pool(p) => Ok(p),
            Slot::Host(v, _) => match &*v {
                Value::Cache(c) => {
                    let pool = Pool::of(c.clone(), &self.program.gpu)?;
                    self.env[s] = Some(Slot::Pool(Arc::clone(&pool)));
                    Ok(pool)
                }
                other => Err(format!("expected a KV cache, found {}", other.kind())),
            },
            Slot::Device(_) => Err("expected a KV cache, found a tensor".into()),
            Slot::Sharded(_) => Err("expected a KV cache, found a sharded tensor".into()),
        }
    }

    /// The buffer output `i` of step `index` is written to, holding at least `bytes`.
    fn output(&self, index: usize, i: usize, bytes: usize) -> wgpu::Buffer {
        let mut buffers = self.program.buffers.borrow_mut();
        let buffer = buffers
            .outputs
            .entry((index, i))
            .or_insert_with(|| self.program.gpu.storage("output", bytes as u64));
        if buffer.size() < bytes as u64 {
            *buffer = self.program.gpu.storage("output", bytes as u64);
        }
        buffer.clone()
    }

    /// Records a dispatch of `pipeline` over `workgroups` workgroups with parameters
    /// `words` and storage `bindings` (in the shader's binding order).
    fn dispatch(
        &mut self,
        pipeline: &wgpu::ComputePipeline,
        words: &[u32],
        bindings: &[&wgpu::Buffer],
        workgroups: usize,
    ) -> Result<(), String> {
        if workgroups == 0 {
            return Ok(());
        }
        let max = self.gpu().limits().max_workgroups_per_dim as usize;
        let x = workgroups.min(max);
        let y = workgroups.div_ceil(x);
        if y > max {
            return Err(format!(
                "{workgroups} workgroups exceed the device's {max} x {max} grid"
            ));
        }
        let offset = self.params.len() as u64;
        // Every block has the stride's bytes (a strided body's parameters fill them).
        let mut block = [0u32; PARAM_STRIDE as usize / 4];
        block
            .get_mut(..words.len())
            .ok_or("more parameters than a block holds")?
            .copy_from_slice(words);
        self.params.extend_from_slice(bytemuck::cast_slice(&block));
        let params = self.params_buffer()?;
        let key = (
            pipeline.clone(),
            offset,
            bindings.iter().map(|b| (*b).clone()).collect::<Vec<_>>(),
        );
        let group = {
            let mut buffers = self.program.buffers.borrow_mut();
            if buffers.groups.len() > 4096 {
                buffers.groups.clear();
            }
            buffers
                .groups
                .entry(key)
                .or_insert_with(|| {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params,
                            offset,
                            size: wgpu::BufferSize::new(PARAM_STRIDE),
                        }),
                    }];
                    for (i, b) in bindings.iter().enumerate() {
                        entries.push(wgpu::BindGroupEntry {
                            binding: i as u32 + 1,
                            resource: b.as_entire_binding(),
                        });
                    }
                    self.program
                        .gpu
                        .device()
                        .create_bind_group(&wgpu::BindGroupDescriptor {
                            label: None,
                            layout: &pipeline.get_bind_group_layout(0),
                            entries: &entries,
                        })
                })
                .clone()
        };
        self.pending.push(Dispatch {
            pipeline: pipeline.clone(),
            group,
            grid: [x as u32, y as u32],
        });
        Ok(())
    }

    /// The word shaders report a fault in (the lowest faulting step's number), set to
    /// `u32::MAX` (no fault) before this call's first use.
    fn fault_word(&mut self) -> wgpu::Buffer {
        let buffer = self
            .program
            .buffers
            .borrow_mut()
            .faults
            .get_or_insert_with(|| self.program.gpu.storage("faults", 4))
            .clone();
        if !self.faults {
            self.gpu().write(&buffer, 0, &u32::MAX.to_le_bytes());
            self.faults = true;
        }
        buffer
    }

    /// The step whose shader faulted during this call, if any (the first by number).
    pub fn fault(&mut self) -> Result<Option<usize>, String> {
        if !self.faults {
            return Ok(None);
        }
        let buffer = self.fault_word();
        let bytes = self.flush(&[(&buffer, 4)])?.concat();
        let word = u32::from_le_bytes(bytes[..4].try_into().map_err(|_| "a short read")?);
        Ok((word != u32::MAX).then_some(word as usize))
    }

    /// The parameter buffer, sized for the program's dispatches before the call records
    /// any (a buffer replaced mid-call would leave recorded bind groups on the old one).
    fn params_buffer(&self) -> Result<wgpu::Buffer, String> {
        let buffers = self.program.buffers.borrow();
        match &buffers.params {
            Some(b) if b.size() >= self.params.len() as u64 => Ok(b.clone()),
            _ => Err("more dispatches than the program planned".into()),
        }
    }

    /// Submits the recorded dispatches and reads back `reads`.
    fn flush(&mut self, reads: &[(&wgpu::Buffer, u64)]) -> Result<Vec<Vec<u8>>, String> {
        let gpu = &self.program.gpu;
        if !self.params.is_empty() {
            gpu.write(&self.params_buffer()?, 0, &self.params);
        }
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for d in self.pending.drain(..) {
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &d.group, &[]);
                pass.dispatch_workgroups(d.grid[0], d.grid[1], 1);
            }
        }
        gpu.submit_and_read(encoder, reads).map_err(|e| e.0)
    }

    /// Reads a device tensor back into a host value.
    fn read_tensor(&mut self, t: &DeviceTensor) -> Result<Value, String> {
        let quant = match t.elem {
            Elem::Packed(format) => Some(
                format
                    .quant_format()
                    .ok_or("f16-stored weights are not read back")?,
            ),
            _ => None,
        };
        // An unsplit tensor is read whole; parts hold whole rows.
        let whole = quant
            .as_ref()
            .map_or(t.len() * 4, |q| storage_bytes(q, &t.shape));
        let row = row_bytes(&t.shape, t.elem);
        let reads: Vec<(&wgpu::Buffer, u64)> = t
            .parts
            .iter()
            .map(|p| {
                let bytes = if t.parts.len() == 1 {
                    whole
                } else {
                    p.rows * row
                };
                (&p.buffer, bytes as u64)
            })
            .collect();
        let bytes: Vec<u8> = self.flush(&reads)?.concat();
        Ok(match t.elem {
            Elem::F32 | Elem::Narrow(_) => Value::Tensor(Tensor::from_f32(
                t.shape.clone(),
                match t.elem {
                    Elem::Narrow(dtype) => dtype,
                    _ => DType::F32,
                },
                bytemuck::pod_collect_to_vec(&bytes),
            )),
            Elem::I32(dtype) => {
                let ints: Vec<i32> = bytemuck::pod_collect_to_vec(&bytes);
                Value::Tensor(Tensor::from_i64(
                    t.shape.clone(),
                    dtype,
                    ints.into_iter().map(i64::from).collect(),
                ))
            }
            Elem::Packed(_) => Value::Quantized(QTensor {
                shape: t.shape.clone(),
                format: quant.ok_or("not a quantized tensor")?,
                bytes,
            }),
        })
    }

    /// Reads a device pool back into a host cache (after the recorded dispatches).
    fn read_pool(&mut self, pool: &Pool) -> Result<KvCache, String> {
        self.flush(&[])?;
        read_pool(pool)
    }

    /// Evaluates a step on the host.
    pub fn reference(
        &mut self,
        ctx: &Context,
        step: &Step,
        weights: &dyn WeightStore,
    ) -> Result<(), String> {
        let inputs = step
            .inputs
            .iter()
            .map(|&s| self.host(s))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = interp::eval_op(ctx, step.op, inputs, weights)?;
        for (&s, v) in step.outputs.iter().zip(outputs) {
            self.env[s] = Some(Slot::Host(v, None));
        }
        Ok(())
    }

    /// Reads back the returned values.
    pub fn finish(&mut self, ctx: &Context, step: &Step) -> Result<Vec<Value>, String> {
        let mut results = Vec::with_capacity(step.inputs.len());
        for (j, &s) in step.inputs.iter().enumerate() {
            let value = match self.slot(s)?.clone() {
                Slot::Pool(pool) => Value::Cache(pool.cache()),
                _ => Rc::unwrap_or_clone(self.host(s)?),
            };
            self.program.signature.check_result(ctx, j, &value)?;
            results.push(value);
        }
        Ok(results)
    }

    /// Runs a kernel step's dispatches; `false` when its run-time shapes need the
    /// reference semantics instead.
    pub fn kernel(
        &mut self,
        index: usize,
        step: &Step,
        kernel: &Kernel,
        pipelines: &[wgpu::ComputePipeline],
    ) -> Result<bool, String> {
        let out = match kernel {
            Kernel::ShardedLinear { .. }
            | Kernel::Mesh(_)
            | Kernel::AllReduce { .. }
            | Kernel::ReduceScatter { .. } => {
                return self.mesh_step(index, step, kernel, pipelines);
            }
            // Only the collectives fold (no op selects a fold of its own).
            Kernel::Fold(_) => return Ok(false),
            Kernel::TopK { n, k, index: dtype } => {
                let x = self.f32_rows(step.inputs[0], *n)?;
                let rows = x.len() / n;
                let (values, ids) = (
                    self.output(index, 0, rows * k * 4),
                    self.output(index, 1, rows * k * 4),
                );
                self.dispatch(
                    &pipelines[0],
                    &[rows as u32],
                    &[x.whole()?, &values, &ids],
                    rows.div_ceil(WG),
                )?;
                let mut shape = x.shape.clone();
                *shape.last_mut().expect("rows of n") = *k;
                let ids = DeviceTensor::unsplit(shape.clone(), Elem::I32(*dtype), ids);
                self.env[step.outputs[1]] = Some(Slot::Device(ids));
                DeviceTensor::f32(shape, values)
            }
            Kernel::ExpertContraction { expert, per_slot } => {
                self.expert_contraction(index, step, (expert, *per_slot), pipelines)?
            }
            Kernel::Contraction(c) => self.contraction(index, step, c, pipelines)?,
            Kernel::Elementwise(body) | Kernel::Broadcast(body) => {
                let xs = step
                    .inputs
                    .iter()
                    .map(|&s| self.device(s))
                    .collect::<Result<Vec<_>, _>>()?;
                // Values of the body's element type (f16 and bf16 ones held as f32).
                let elem = elem_of(body.dtype);
                if xs.len() != body.args || xs.iter().any(|x| x.elem != elem) {
                    return Ok(false);
                }
                let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape.as_slice()).collect();
                // Simplified dims beyond the strided shader's run through the reference
                // semantics.
                let Some(BroadcastLayout {
                    shape,
                    dims,
                    strides,
                    outer,
                    outer_strides,
                }) = broadcast_layout(&shapes).filter(|l| l.outer.len() + 4 <= STRIDED_RANK)
                else {
                    return Ok(false);
                };
                let len: usize = shape.iter().product();
                let y = self.output(index, 0, len * 4);
                // An empty result (an empty prompt's rows) has nothing to compute.
                if len > 0 {
                    let mut bindings = xs
                        .iter()
                        .map(DeviceTensor::whole)
                        .collect::<Result<Vec<_>, _>>()?;
                    bindings.push(&y);
                    // Along leading dims only: the plain shader reads operand `a` at
                    // `i % len`.
                    let leading = |x: &DeviceTensor| {
                        let trimmed: Vec<usize> =
                            x.shape.iter().copied().skip_while(|&d| d == 1).collect();
                        shape.ends_with(&trimmed)
                    };
                    if xs.iter().all(leading) {
                        let mut words = vec![len as u32];
                        words.extend(xs.iter().map(|x| x.len() as u32));
                        self.dispatch(&pipelines[0], &words, &bindings, len.div_ceil(WG))?;
                    } else if let Some(strided) = pipelines.get(1) {
                        // The outer dims then the last four, padded in front to the rank.
                        let pad = STRIDED_RANK - outer.len() - 4;
                        let mut words = vec![1u32; pad];
                        words.extend(outer.iter().chain(&dims).map(|&d| d as u32));
                        for (o, s) in outer_strides.iter().zip(&strides) {
                            words.extend(std::iter::repeat_n(0, pad));
                            words.extend(o.iter().chain(s).map(|&s| s as u32));
                        }
                        self.dispatch(strided, &words, &bindings, len.div_ceil(WG))?;
                    } else {
                        return Ok(false);
                    }
                }
                DeviceTensor::unsplit(shape, elem, y)
            }
            Kernel::RmsNorm { d, .. } | Kernel::LayerNorm { d, .. } => {
                let x = self.f32_rows(step.inputs[0], *d)?;
                let mut params = Vec::new();
                for &s in &step.inputs[1..] {
                    let p = self.device(s)?;
                    if p.len() != *d {
                        return Err(format!("a norm parameter {:?} is not [{d}]", p.shape));
                    }
                    params.push(p);
                }
                let rows = x.len() / d;
                let y = self.output(index, 0, x.len() * 4);
                let mut bindings = vec![x.whole()?];
                for p in &params {
                    bindings.push(p.whole()?);
                }
                bindings.push(&y);
                self.dispatch(&pipelines[0], &[rows as u32], &bindings, rows)?;
                DeviceTensor::f32(x.shape.clone(), y)
            }
            Kernel::Softmax { n, inner } => {
                let x = self.f32_axis(step.inputs[0], *n, *inner)?;
                let rows = x.len() / n;
                let y = self.output(index, 0, x.len() * 4);
                self.dispatch(&pipelines[0], &[rows as u32], &[x.whole()?, &y], rows)?;
                DeviceTensor::f32(x.shape.clone(), y)
            }
            Kernel::Argmax {
                n,
                inner,
                index: dtype,
            } => {
                let x = self.f32_axis(step.inputs[0], *n, *inner)?;
                let rows = x.len() / n;
                let y = self.output(index, 0, rows * 4);
                self.dispatch(&pipelines[0], &[rows as u32], &[x.whole()?, &y], rows)?;
                DeviceTensor::unsplit(resolve_shape(&step.dims, rows)?, Elem::I32(*dtype), y)
            }
            Kernel::Dequantize { weight, rows, k } => {
                let w = self.device(step.inputs[0])?;
                if w.elem != Elem::Packed(*weight) || w.len() != rows * k {
                    return Err(format!(
                        "the operand {:?} is not {rows} rows of {k} {} values",
                        w.shape,
                        weight.name()
                    ));
                }
                let y = self.output(index, 0, rows * k * 4);
                for part in &w.parts {
                    self.dispatch(
                        &pipelines[0],
                        &[part.rows as u32, part.first as u32],
                        &[&part.buffer, &y],
                        (part.rows * k).div_ceil(WG),
                    )?;
                }
                DeviceTensor::f32(w.shape.clone(), y)
            }
            Kernel::Rope { heads, d, .. } => {
                let x = self.device(step.inputs[0])?;
                let positions = self.host(step.inputs[1])?;
                let positions = positions.tensor()?.ints()?;
                let r = x.shape.len();
                if r < 2
                    || x.shape[r - 2..] != [*heads, *d]
                    || positions.len() * heads * d != x.len()
                {
                    return Err(format!(
                        "{} positions do not match the tokens of {:?}",
                        positions.len(),
                        x.shape
                    ));
                }
                let tokens = positions.len();
                let factors = step.inputs.get(2).map(|&s| self.host(s)).transpose()?;
                let factors = match &factors {
                    Some(f) => f.tensor()?.floats()?,
                    None => &[],
                };
                let angles = rope_angles(kernel, factors)?;
                // Every layer's q and k rotate by the same positions: the tables are made
                // and uploaded once per call.
                let key = (angles, step.inputs[1]);
                let (cos_b, sin_b) = match self.ropes.iter().find(|(k, _)| *k == key) {
                    Some((_, tables)) => tables.clone(),
                    None => {
                        let (cos, sin) = key.0.tables(positions);
                        let cos_b = self.output(index, 1, cos.len() * 4);
                        let sin_b = self.output(index, 2, sin.len() * 4);
                        self.gpu().write(&cos_b, 0, bytemuck::cast_slice(&cos));
                        self.gpu().write(&sin_b, 0, bytemuck::cast_slice(&sin));
                        self.ropes.push((key, (cos_b.clone(), sin_b.clone())));
                        (cos_b, sin_b)
                    }
                };
                let y = self.output(index, 0, x.len() * 4);
                self.dispatch(
                    &pipelines[0],
                    &[tokens as u32],
                    &[x.whole()?, &cos_b, &sin_b, &y],
                    x.len().div_ceil(WG),
                )?;
                DeviceTensor::f32(x.shape.clone(), y)
            }
            Kernel::Attention {
                heads,
                kv_heads,
                d,
                source,
                sinks,
                ..
            } => {
                let shape = [*heads, *kv_heads, *d];
                return self
                    .attention(index, step, shape, (*source, *sinks), pipelines)
                    .map(|()| true);
            }
            Kernel::BatchedMatmul { transposed } => {
                self.batched_matmul(index, step, *transposed, &pipelines[0])?
            }
            Kernel::Quantize {
                format,
                rows: Some(rows),
                k,
            } if matches!(
                format,
                WeightFormat::Nf4 { .. } | WeightFormat::Affine { .. }
            ) =>
            {
                let x = self.device(step.inputs[0])?;
                if x.elem != Elem::F32 || x.len() != rows * k {
                    return Err(format!(
                        "the operand {:?} is not {rows} rows of {k}",
                        x.shape
                    ));
                }
                let g = GroupQuantize {
                    format: *format,
                    rows: *rows,
                    k: *k,
                };
                let scales = self.output(index, 1, 8 * g.groups());
                let y = self.output(index, 0, g.bytes().next_multiple_of(4));
                let x_buffer = x.whole()?;
                let (groups, words) = (g.groups(), g.bytes().div_ceil(4));
                let bindings = [x_buffer, &scales];
                self.dispatch(
                    &pipelines[0],
                    &[groups as u32],
                    &bindings,
                    groups.div_ceil(WG),
                )?;
                let bindings = [x_buffer, &scales, &y];
                self.dispatch(
                    &pipelines[1],
                    &[words as u32],
                    &bindings,
                    words.div_ceil(WG),
                )?;
                DeviceTensor::unsplit(x.shape.clone(), Elem::Packed(*format), y)
            }
            Kernel::Quantize { format, rows, k } => {
                let x = self.device(step.inputs[0])?;
                if x.elem != Elem::F32 || !whole_rows(*rows, x.len(), *k) {
                    return Err(format!(
                        "the operand {:?} is not whole rows of {k}",
                        x.shape
                    ));
                }
                let rows = x.len() / k;
                let blocks = rows * k / format.block().unwrap_or(1).max(1);
                let bytes = format.row_bytes(*k) * rows;
                let per_unit = blocks_per_invocation(*format);
                let y = self.output(index, 0, bytes.next_multiple_of(4));
                // The second word (`zero`) is 0: the K-quant searches keep their products
                // apart through it.
                self.dispatch(
                    &pipelines[0],
                    &[blocks as u32, 0],
                    &[x.whole()?, &y],
                    blocks.div_ceil(per_unit).div_ceil(WG),
                )?;
                DeviceTensor::unsplit(x.shape.clone(), Elem::Packed(*format), y)
            }
            Kernel::Cast { from, to } => {
                let x = self.device(step.inputs[0])?;
                if x.elem != elem_of(*from) {
                    return Err(format!("the operand is not {}", from.name()));
                }
                let y = self.output(index, 0, x.len() * 4);
                let len = x.len();
                let mut bindings = vec![x.whole()?, &y];
                // A float cast to i64 reports values beyond 32 bits as this step's fault.
                let fault = (from.is_float() && *to == DType::I64).then(|| self.fault_word());
                bindings.extend(fault.as_ref());
                self.dispatch(
                    &pipelines[0],
                    &[len as u32, index as u32],
                    &bindings,
                    len.div_ceil(WG),
                )?;
                DeviceTensor::unsplit(x.shape.clone(), elem_of(*to), y)
            }
            Kernel::KvAppend {
                layer, rounding, ..
            } => {
                let pool = self.pool(step.inputs[0])?;
                let [k, v, slots] = [step.inputs[1], step.inputs[2], step.inputs[3]];
                self.append(&pool, (*layer, *rounding), [k, v, slots], &pipelines[0])?;
                self.env[step.outputs[0]] = Some(Slot::Pool(pool));
                return Ok(true);
            }
            Kernel::KvLookup { layer, .. } => {
                self.lookup(index, step, *layer, &pipelines[0])?;
                return Ok(true);
            }
            Kernel::Move(m) => self.movement(index, step, *m, pipelines)?,
            Kernel::Slice { .. } | Kernel::Transpose { .. } => {
                let x = self.device(step.inputs[0])?;
                let (shape, first, strides) = match kernel {
                    Kernel::Transpose { perm } => {
                        let (shape, strides) = permute_layout(&x.shape, perm)?;
                        (shape, 0, strides)
                    }
                    Kernel::Slice { starts, steps } => {
                        slice_layout(&x.shape, starts, steps, &step.dims)?
                    }
                    _ => return Ok(false),
                };
                match self.strided_copy(&pipelines[0], &x, (&shape, &strides, first), (index, 0))? {
                    Some(y) => y,
                    // More than four dims that do not merge.
                    None => return Ok(false),
                }
            }
        };
        self.env[step.outputs[0]] = Some(Slot::Device(out));
        Ok(true)
    }

    /// The `f32` device tensor of slot `s`, reduced along an axis of `n` values whose
    /// consecutive values are `inner` apart.
    fn f32_axis(&mut self, s: usize, n: usize, inner: usize) -> Result<DeviceTensor, String> {
        let x = self.device(s)?;
        if x.elem != Elem::F32 || n == 0 || !x.len().is_multiple_of(n * inner) {
            return Err(format!(
                "the input {:?} has no axis of {n} with {inner} values after it",
                x.shape
            ));
        }
        Ok(x)
    }

    /// The `f32` device tensor of slot `s`, whose rows have `n` values.
    fn f32_rows(&mut self, s: usize, n: usize) -> Result<DeviceTensor, String> {
        let x = self.device(s)?;
        if x.shape.last() != Some(&n) || x.elem != Elem::F32 {
            return Err(format!("the input {:?} does not end in {n}", x.shape));
        }
        Ok(x)
    }

    /// The q8_0 rows of `k` values of operand `s` dequantized into the step's scratch
    /// output (slot 1) by `pipeline`.
    fn dequantized_rows(
        &mut self,
        index: usize,
        s: usize,
        k: usize,
        pipeline: &wgpu::ComputePipeline,
    ) -> Result<DeviceTensor, String> {
        let x = self.device(s)?;
        if x.shape.last() != Some(&k) || x.elem != Elem::Packed(WeightFormat::Q8_0) {
            return Err(format!("the input {:?} is not q8_0 rows of {k}", x.shape));
        }
        let rows = x.len() / k.max(1);
        let y = self.output(index, 1, rows * k * 4);
        self.dispatch(
            pipeline,
            &[rows as u32, 0],
            &[x.whole()?, &y],
            (rows * k).div_ceil(WG),
        )?;
        Ok(DeviceTensor::f32(x.shape.clone(), y))
    }

    /// A contraction by `pipelines[0]`; quantized activations are dequantized first, by
    /// `pipelines[1]`.
    fn contraction(
        &mut self,
        index: usize,
        step: &Step,
        c: &Contraction,
        pipelines: &[wgpu::ComputePipeline],
    ) -> Result<DeviceTensor, String> {
        let pipeline = &pipelines[0];
        let x = if c.q8_0_input {
            self.dequantized_rows(index, step.inputs[0], c.k, &pipelines[1])?
        } else {
            self.f32_rows(step.inputs[0], c.k)?
        };
        let g = match c.norm_eps_bits {
            Some(_) => {
                let g = self.device(step.inputs[1])?;
                if g.len() != c.k {
                    return Err(format!("the norm weight {:?} is not [{}]", g.shape, c.k));
                }
                Some(g)
            }
            None => None,
        };
        let w = self.device(step.inputs[weight_operand(c)])?;
        let want = weight_elem(c.weight);
        if w.shape != [c.n, c.k] || w.elem != want {
            return Err(format!(
                "the weight {:?} is not a {}x{} {} matrix",
                w.shape,
                c.n,
                c.k,
                c.weight.name()
            ));
        }
        let m = x.len() / c.k.max(1);
        let shape = product_shape(&x.shape, c.n);
        let residual = if c.residual {
            let r = self.device(*step.inputs.last().ok_or("no residual operand")?)?;
            if r.shape != shape {
                return Err(format!(
                    "the residual {:?} does not match the product {shape:?}",
                    r.shape
                ));
            }
            Some(r)
        } else {
            None
        };
        let y = self.output(index, 0, m * c.n * 4);
        let mut extra = Vec::new();
        if let Some(g) = &g {
            extra.push(g.whole()?);
        }
        if let Some(r) = &residual {
            extra.push(r.whole()?);
        }
        self.contract_parts(pipeline, (&x, &w, &y), &extra, c.n)?;
        Ok(DeviceTensor::f32(shape, y))
    }

    /// An expert contraction ([`Kernel::ExpertContraction`]) of `c`, one expert's: one
    /// dispatch for each part of the stacked weight (whole experts each), in which the
    /// slots whose experts the part holds compute. An id outside the experts is the
    /// step's fault.
    fn expert_contraction(
        &mut self,
        index: usize,
        step: &Step,
        (c, per_slot): (&Contraction, bool),
        pipelines: &[wgpu::ComputePipeline],
    ) -> Result<DeviceTensor, String> {
        let x = self.f32_rows(step.inputs[0], c.k)?;
        let (w, ids) = (self.device(step.inputs[1])?, self.device(step.inputs[2])?);
        let want = weight_elem(c.weight);
        let (&[experts, n, k], &[tokens, slots]) = (w.shape.as_slice(), ids.shape.as_slice())
        else {
            return Err(format!(
                "the weight {:?} is not [E, N, K] or the ids {:?} not [T, S]",
                w.shape, ids.shape
            ));
        };
        let x_rows = if per_slot { tokens * slots } else { tokens };
        if [n, k] != [c.n, c.k] || w.elem != want || !matches!(ids.elem, Elem::I32(_)) {
            return Err(format!(
                "the weight {:?} is not experts of {}x{} {}, or the ids are not integers",
                w.shape,
                c.n,
                c.k,
                c.weight.name()
            ));
        }
        if x.len() != x_rows * c.k {
            return Err(format!(
                "the input {:?} is not {x_rows} rows of {}",
                x.shape, c.k
            ));
        }
        let m = tokens * slots;
        let y = self.output(index, 0, m * c.n * 4);
        let fault = self.fault_word();
        for part in &w.parts {
            self.dispatch(
                &pipelines[0],
                &[
                    m as u32,
                    c.n as u32,
                    0,
                    c.n as u32,
                    slots as u32,
                    experts as u32,
                    index as u32,
                    part.first as u32,
                    part.rows as u32,
                ],
                &[x.whole()?, &part.buffer, &y, ids.whole()?, &fault],
                c.n.div_ceil(CONTRACTION_ROWS as usize) * m,
            )?;
        }
        Ok(DeviceTensor::f32(vec![tokens, slots, c.n], y))
    }

    /// Dispatches a contraction of the rows of `x` (`n` outputs each) by every part of
    /// `w` into `y`; `extra` are the bindings after `y` (norm weight, residual).
    fn contract_parts(
        &mut self,
        pipeline: &wgpu::ComputePipeline,
        (x, w, y): (&DeviceTensor, &DeviceTensor, &wgpu::Buffer),
        extra: &[&wgpu::Buffer],
        n: usize,
    ) -> Result<(), String> {
        let k = w.shape.last().copied().unwrap_or(1);
        let m = x.len() / k.max(1);
        for part in &w.parts {
            let mut bindings = vec![x.whole()?, &part.buffer, y];
            bindings.extend_from_slice(extra);
            let workgroups = match self.program.rows {
                Rows::Few => part.rows.div_ceil(CONTRACTION_ROWS as usize) * m,
                Rows::Many => part.rows.div_ceil(TILE as usize) * m.div_ceil(TILE as usize),
            };
            self.dispatch(
                pipeline,
                &[m as u32, n as u32, part.first as u32, part.rows as u32],
                &bindings,
                workgroups,
            )?;
        }
        Ok(())
    }

    fn attention(
        &mut self,
        index: usize,
        step: &Step,
        [heads, kv_heads, d]: [usize; 3],
        (source, sinks): (AttentionSource, bool),
        pipelines: &[wgpu::ComputePipeline],
    ) -> Result<(), String> {
        let q = self.device(step.inputs[0])?;
        let r = q.shape.len();
        if r < 3 || q.shape[r - 2..] != [heads, d] || q.elem != Elem::F32 {
            return Err(format!(
                "queries {:?} do not have {heads} heads of {d}",
                q.shape
            ));
        }
        // The attention sinks, the op's last operand where it has them.
        let sinks = if sinks {
            let at = source.operands();
            let s = step.inputs.get(at).ok_or_else(|| {
                format!(
                    "the attention has {} operands, not its sinks (operand {at})",
                    step.inputs.len()
                )
            })?;
            let s = self.device(*s)?;
            if s.shape != [heads] || s.elem != Elem::F32 {
                return Err(format!(
                    "the attention sinks are {:?} of {:?}, expected [{heads}] of f32",
                    s.shape, s.elem
                ));
            }
            Some(s)
        } else {
            None
        };
        let sinks = sinks.as_ref().map(|s| s.whole()).transpose()?;
        let y = self.output(index, 0, q.len() * 4);
        match source {
            AttentionSource::Paged {
                layer,
                window,
                append,
                rounding,
            } => {
                let pool = self.pool(step.inputs[1])?;
                let p = &pool.params;
                if layer >= p.layers as usize
                    || p.kv_heads as usize != kv_heads
                    || p.head_dim as usize != d
                {
                    return Err(format!(
                        "layer {layer} with {kv_heads} heads of {d} does not fit a cache of {} layers of {} heads of {}",
                        p.layers, p.kv_heads, p.head_dim
                    ));
                }
                if r != 4 {
                    return Err(format!("queries {:?} are not [b, t, heads, d]", q.shape));
                }
                let (tables_at, lens_at) = if append { (5, 6) } else { (2, 3) };
                let (b, t) = (q.shape[0], q.shape[1]);
                self.check_paged(
                    &pool,
                    [b, t],
                    [step.inputs[tables_at], step.inputs[lens_at]],
                    window,
                )?;
                if append {
                    let [k, v, slots] = [step.inputs[2], step.inputs[3], step.inputs[4]];
                    self.append(&pool, (layer, rounding), [k, v, slots], &pipelines[0])?;
                }
                let tables = self.device(step.inputs[tables_at])?;
                let lens = self.device(step.inputs[lens_at])?;
                let width = tables.shape.get(1).copied().unwrap_or(0);
                // The longest visible context (checked above against the block tables).
                let longest = self
                    .host(step.inputs[lens_at])?
                    .tensor()?
                    .ints()?
                    .iter()
                    .map(|&len| (len.max(0) as usize).min(window.unwrap_or(usize::MAX)))
                    .max()
                    .unwrap_or(0);
                let words = [
                    (b * t) as u32,
                    t as u32,
                    width as u32,
                    window.unwrap_or(0) as u32,
                    p.block_size as u32,
                ];
                let inputs = [
                    q.whole()?,
                    &pool.k[layer],
                    &pool.v[layer],
                    tables.whole()?,
                    lens.whole()?,
                ];
                let shaders = &pipelines[pipelines.len() - 3..];
                self.attend(
                    index,
                    shaders,
                    &words,
                    (&inputs, sinks),
                    [b * t, heads, d],
                    longest,
                    &y,
                )?;
                self.env[step.outputs[0]] =
                    Some(Slot::Device(DeviceTensor::f32(q.shape.clone(), y)));
                if append && let Some(&out) = step.outputs.get(1) {
                    self.env[out] = Some(Slot::Pool(pool));
                }
            }
            AttentionSource::Contiguous {
                causal,
                window,
                masked,
            } => {
                let (kt, vt) = (self.device(step.inputs[1])?, self.device(step.inputs[2])?);
                let [tq, tk] = contiguous_attention_shape(
                    [&q.shape, &kt.shape, &vt.shape],
                    [kv_heads, d],
                    causal,
                )?;
                let rows = q.len() / (heads * d);
                let words = [
                    rows as u32,
                    tq as u32,
                    tk as u32,
                    window.unwrap_or(0) as u32,
                    u32::from(causal),
                ];
                let mask = if masked {
                    let m = self.device(step.inputs[3])?;
                    if m.shape != [tq, tk] || m.elem != Elem::F32 {
                        return Err(format!(
                            "the mask has shape {:?}, expected [{tq}, {tk}]",
                            m.shape
                        ));
                    }
                    Some(m)
                } else {
                    None
                };
                let mut inputs = vec![q.whole()?, kt.whole()?, vt.whole()?];
                if let Some(m) = &mask {
                    inputs.push(m.whole()?);
                }
                // A window bounds what a causal row sees; a non-causal row sees up to the
                // last key whatever the window.
                let longest = if causal {
                    tk.min(window.unwrap_or(usize::MAX))
                } else {
                    tk
                };
                self.attend(
                    index,
                    pipelines,
                    &words,
                    (&inputs, sinks),
                    [rows, heads, d],
                    longest,
                    &y,
                )?;
                self.env[step.outputs[0]] =
                    Some(Slot::Device(DeviceTensor::f32(q.shape.clone(), y)));
            }
        }
        Ok(())
    }

    /// A general matmul: `x [.., m, k]` against `w` (`[k, n]`, or `[n, k]` when
    /// `transposed`, shared or with `x`'s batch dims), checked as the reference checks.
    fn batched_matmul(
        &mut self,
        index: usize,
        step: &Step,
        transposed: bool,
        pipeline: &wgpu::ComputePipeline,
    ) -> Result<DeviceTensor, String> {
        let (x, w) = (self.device(step.inputs[0])?, self.device(step.inputs[1])?);
        if x.elem != Elem::F32 || w.elem != Elem::F32 {
            return Err(format!("cannot multiply {:?} by {:?}", x.shape, w.shape));
        }
        let dims = batched_matmul_dims(&x.shape, &w.shape, transposed)?;
        let MatmulDims {
            batch,
            m,
            k,
            n,
            batched,
        } = dims;
        let y = self.output(index, 0, batch * m * n * 4);
        self.dispatch(
            pipeline,
            &[
                batch as u32,
                m as u32,
                k as u32,
                n as u32,
                u32::from(batched),
            ],
            &[x.whole()?, w.whole()?, &y],
            (batch * m * n).div_ceil(WG),
        )?;
        Ok(DeviceTensor::f32(dims.result_shape(&x.shape), y))
    }

    /// Writes the key and value rows of slots `[k, v, slots]` to their cache slots of
    /// `layer` (every slot checked against the pool first).
    fn append(
        &mut self,
        pool: &Pool,
        (layer, rounding): (usize, KvRounding),
        [k, v, slots_at]: [usize; 3],
        pipeline: &wgpu::ComputePipeline,
    ) -> Result<(), String> {
        let (kn, vn) = (self.device(k)?, self.device(v)?);
        let p = &pool.params;
        let row = (p.kv_heads * p.head_dim) as usize;
        let slots = self.host(slots_at)?;
        let slots = slots.tensor()?.ints()?;
        let capacity = pool.blocks * p.block_size as usize;
        if kn.shape != vn.shape || kn.len() != slots.len() * row || layer >= pool.k.len() {
            return Err(format!(
                "keys {:?} and values {:?} do not hold {} rows of {row} for layer {layer}",
                kn.shape,
                vn.shape,
                slots.len()
            ));
        }
        if let Some(bad) = slots.iter().find(|&&s| s < 0 || s as usize >= capacity) {
            return Err(format!(
                "slot {bad} is out of range for a pool of {capacity} slots"
            ));
        }
        let tokens = slots.len();
        let slot_buf = self.device(slots_at)?;
        self.dispatch(
            pipeline,
            &[tokens as u32],
            &[
                kn.whole()?,
                vn.whole()?,
                slot_buf.whole()?,
                &pool.k[layer],
                &pool.v[layer],
            ],
            (tokens * row)
                .div_ceil(kv_append_values_per_invocation(rounding))
                .div_ceil(WG),
        )
    }

    /// Gathers the first `len` positions of a sequence from `layer` through its block
    /// table (`llm.lookup_kv`), every entry checked against the pool first.
    fn lookup(
        &mut self,
        index: usize,
        step: &Step,
        layer: usize,
        pipeline: &wgpu::ComputePipeline,
    ) -> Result<(), String> {
        let pool = self.pool(step.inputs[0])?;
        let (table_at, len_at) = (step.inputs[1], step.inputs[2]);
        let table = self.host(table_at)?;
        let len = self.host(len_at)?;
        let (table, len) = (table.tensor()?.ints()?, len.tensor()?.ints()?);
        let len = match len {
            [len] if *len >= 0 => *len as usize,
            _ => return Err(format!("the context length {len:?} is not one count")),
        };
        let shape_only = pool.shape_only();
        for pos in 0..len {
            slot_of(&shape_only, table, pos)?;
        }
        let p = &pool.params;
        let row = (p.kv_heads * p.head_dim) as usize;
        let shape = vec![len, p.kv_heads as usize, p.head_dim as usize];
        let (ko, vo) = (
            self.output(index, 0, len * row * 4),
            self.output(index, 1, len * row * 4),
        );
        if len > 0 {
            let tables = self.device(table_at)?;
            self.dispatch(
                pipeline,
                &[len as u32, p.block_size as u32],
                &[&pool.k[layer], &pool.v[layer], tables.whole()?, &ko, &vo],
                (len * row).div_ceil(WG),
            )?;
        }
        self.env[step.outputs[0]] = Some(Slot::Device(DeviceTensor::f32(shape.clone(), ko)));
        self.env[step.outputs[1]] = Some(Slot::Device(DeviceTensor::f32(shape, vo)));
        Ok(())
    }

    /// Dispatches attention over `inputs` (all bindings but the sinks and the output) and
    /// the attention `sinks` where the shaders take them into `y`: one
    /// workgroup per query row and head (`shaders[0]`), or, when the longest visible
    /// context spans several chunks, one per row, head and chunk (`shaders[1]`) writing
    /// partial states that `shaders[2]` merges. A row's chunks start at its own first
    /// visible position, so its result does not depend on the other rows; a row of one
    /// chunk gets exactly what the unsplit shader computes.
    #[allow(
        clippy::too_many_arguments,
        reason = "one dispatch decision, all its inputs"
    )]
    fn attend(
        &mut self,
        index: usize,
        shaders: &[wgpu::ComputePipeline],
        words: &[u32],
        (inputs, sinks): (&[&wgpu::Buffer], Option<&wgpu::Buffer>),
        [rows, heads, d]: [usize; 3],
        longest: usize,
        y: &wgpu::Buffer,
    ) -> Result<(), String> {
        let chunk = self.gpu().attention_chunk();
        let splits = longest.div_ceil(chunk);
        let mut bindings = inputs.to_vec();
        bindings.extend(sinks);
        if splits < 2 {
            bindings.push(y);
            return self.dispatch(&shaders[0], words, &bindings, rows * heads);
        }
        let parts = self.output(index, 1, rows * heads * splits * (d + 2) * 4);
        let mut split_words = words.to_vec();
        split_words.extend([splits as u32, chunk as u32]);
        bindings.push(&parts);
        self.dispatch(&shaders[1], &split_words, &bindings, rows * heads * splits)?;
        self.dispatch(
            &shaders[2],
            &[rows as u32, splits as u32],
            &[&parts, y],
            rows * heads,
        )
    }

    /// Checks block tables and context lengths against the pool (what the reference
    /// checks), once per call for each combination.
    fn check_paged(
        &mut self,
        pool: &Pool,
        [b, t]: [usize; 2],
        [tables, lens]: [usize; 2],
        window: Option<usize>,
    ) -> Result<(), String> {
        let key = (tables, lens, t, window.unwrap_or(0));
        if self.validated.contains(&key) {
            return Ok(());
        }
        let (tv, lv) = (self.host(tables)?, self.host(lens)?);
        let shape_only = pool.shape_only();
        for_each_paged_row(
            &shape_only,
            [b, t],
            tv.tensor()?,
            lv.tensor()?,
            window,
            |_, _| Ok(()),
        )?;
        self.validated.insert(key);
        Ok(())
    }

    /// The elements of `x` at `first + Σ c[d] * strides[d]` for every index `c` of
    /// `size`, copied by the strided-copy shader `copy` into output `out` (step and output
    /// number); `None` when more than four dims remain once merged ([`strided_layout`]).
    fn strided_copy(
        &mut self,
        copy: &wgpu::ComputePipeline,
        x: &DeviceTensor,
        (size, strides, first): (&[usize], &[usize], usize),
        (index, i): (usize, usize),
    ) -> Result<Option<DeviceTensor>, String> {
        if matches!(x.elem, Elem::Packed(_)) {
            return Err(format!(
                "cannot copy parts of a packed {:?} tensor",
                x.shape
            ));
        }
        let Some(words) = strided_layout(size, strides, first) else {
            return Ok(None);
        };
        let len: usize = size.iter().product();
        let y = self.output(index, i, len * 4);
        let words: Vec<u32> = words.iter().map(|&w| w as u32).collect();
        self.dispatch(copy, &words, &[x.whole()?, &y], len.div_ceil(WG))?;
        Ok(Some(DeviceTensor::unsplit(size.to_vec(), x.elem, y)))
    }

    /// `xs` concatenated along `axis` into output `out` (step and output number), one
    /// placement per operand.
    fn concatenate(
        &mut self,
        place: &wgpu::ComputePipeline,
        xs: &[&DeviceTensor],
        axis: usize,
        (index, i): (usize, usize),
    ) -> Result<DeviceTensor, String> {
        let first = xs.first().ok_or("nothing to concatenate")?;
        let fits = |x: &DeviceTensor| {
            x.elem == first.elem
                && x.shape.len() == first.shape.len()
                && x.shape
                    .iter()
                    .zip(&first.shape)
                    .enumerate()
                    .all(|(d, (a, b))| d == axis || a == b)
        };
        if axis >= first.shape.len() || matches!(first.elem, Elem::Packed(_)) {
            return Err(format!("cannot concatenate {:?} along {axis}", first.shape));
        }
        if let Some(bad) = xs.iter().find(|x| !fits(x)) {
            return Err(format!(
                "cannot concatenate shapes {:?} and {:?} along {axis}",
                first.shape, bad.shape
            ));
        }
        let mut shape = first.shape.clone();
        shape[axis] = xs.iter().map(|x| x.shape[axis]).sum();
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let total = shape.iter().product::<usize>();
        let y = self.output(index, i, total * 4);
        let mut offset = 0;
        for x in xs {
            let width = x.shape[axis] * inner;
            self.dispatch(
                place,
                &[
                    outer as u32,
                    width as u32,
                    (shape[axis] * inner) as u32,
                    offset as u32,
                ],
                &[x.whole()?, &y],
                (outer * width).div_ceil(WG),
            )?;
            offset += width;
        }
        Ok(DeviceTensor::unsplit(shape, first.elem, y))
    }

    fn movement(
        &mut self,
        index: usize,
        step: &Step,
        m: Movement,
        pipelines: &[wgpu::ComputePipeline],
    ) -> Result<DeviceTensor, String> {
        match m {
            Movement::Concat { axis, .. } => {
                let xs = step
                    .inputs
                    .iter()
                    .map(|&s| self.device(s))
                    .collect::<Result<Vec<_>, _>>()?;
                let xs: Vec<&DeviceTensor> = xs.iter().collect();
                self.concatenate(&pipelines[0], &xs, axis, (index, 0))
            }
            Movement::Reshape => {
                let mut x = self.device(step.inputs[0])?;
                x.shape = resolve_shape(&step.dims, x.len())?;
                if let [p] = x.parts.as_mut_slice() {
                    p.rows = x.shape.first().copied().unwrap_or(1);
                }
                Ok(x)
            }
            Movement::Columns { width, len, .. } => {
                let x = self.f32_rows(step.inputs[0], width)?;
                let rows = x.len() / width.max(1);
                let y = self.output(index, 0, rows * len * 4);
                self.dispatch(
                    &pipelines[0],
                    &[rows as u32],
                    &[x.whole()?, &y],
                    (rows * len).div_ceil(WG),
                )?;
                let mut shape = x.shape.clone();
                *shape.last_mut().ok_or("a scalar has no columns")? = len;
                Ok(DeviceTensor::f32(shape, y))
            }
            Movement::Rows {
                dim,
                vocab,
                table: format,
                ..
            } => {
                let table = self.device(step.inputs[0])?;
                // A float table may be stored as f16 (when it is exactly f16).
                let stored = match format {
                    WeightFormat::F32 => vec![
                        Elem::F32,
                        Elem::Narrow(DType::F16),
                        Elem::Narrow(DType::BF16),
                        Elem::Packed(WeightFormat::F16),
                    ],
                    // An f16 table is read as `f16` where the device has `shader-f16`.
                    WeightFormat::PackedF16 => vec![
                        Elem::Packed(WeightFormat::PackedF16),
                        Elem::Packed(WeightFormat::F16),
                    ],
                    packed => vec![Elem::Packed(packed)],
                };
                if table.shape != [vocab, dim] || !stored.contains(&table.elem) {
                    return Err(format!(
                        "the table {:?} is not a [{vocab}, {dim}] {} table",
                        table.shape,
                        format.name()
                    ));
                }
                let ids = self.host(step.inputs[1])?;
                let ids_t = ids.tensor()?;
                if let Some(bad) = ids_t
                    .ints()?
                    .iter()
                    .find(|&&i| i < 0 || i as usize >= vocab)
                {
                    return Err(format!(
                        "token id {bad} is out of range for a table of {vocab} rows"
                    ));
                }
                let count = ids_t.len();
                let mut shape = ids_t.shape.clone();
                shape.push(dim);
                let ids = self.device(step.inputs[1])?;
                let y = self.output(index, 0, count * dim * 4);
                for part in &table.parts {
                    self.dispatch(
                        &pipelines[0],
                        &[count as u32, part.first as u32, part.rows as u32],
                        &[&part.buffer, ids.whole()?, &y],
                        (count * dim).div_ceil(WG),
                    )?;
                }
                Ok(DeviceTensor::f32(shape, y))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use llm_ir::interp::eval::strides;

    use super::strided_layout;

    /// Dims of 1 vanish and runs read whole merge; the first element stays as given.
    #[test]
    fn strided_copies_merge_their_runs() {
        let box_of = |dims: &[usize], start: &[usize], size: &[usize]| {
            let strides = strides(dims);
            let first = start.iter().zip(&strides).map(|(a, b)| a * b).sum();
            strided_layout(size, &strides, first)
        };
        // Rows 2..4 of a [4, 6]: one run of 12 from element 12.
        assert_eq!(
            box_of(&[4, 6], &[2, 0], &[2, 6]),
            Some([1, 1, 1, 12, 0, 0, 0, 1, 12])
        );
        // Columns 3..6 of every row: 4 rows of 3, 6 apart, from element 3.
        assert_eq!(
            box_of(&[4, 6], &[0, 3], &[4, 3]),
            Some([1, 1, 4, 3, 0, 0, 6, 1, 3])
        );
        // Every other element of 2x2x2x2x2x2 along three dims: three dims left.
        assert_eq!(
            box_of(&[2, 2, 2, 2, 2, 2], &[0; 6], &[2, 1, 2, 1, 2, 1]),
            Some([1, 2, 2, 2, 0, 32, 8, 2, 0])
        );
        assert_eq!(box_of(&[3, 3, 3, 3, 3], &[0; 5], &[2; 5]), None);
        // Steps: every second column of a [3, 8] from column 1 is one run of 12, 2 apart;
        // of a [3, 9], rows of 4.
        assert_eq!(
            strided_layout(&[3, 4], &[8, 2], 1),
            Some([1, 1, 1, 12, 0, 0, 0, 2, 1])
        );
        assert_eq!(
            strided_layout(&[3, 4], &[9, 2], 1),
            Some([1, 1, 3, 4, 0, 0, 9, 2, 1])
        );
    }
}
