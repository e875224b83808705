//! Sharded values on the GPU: each mesh device's shard is a tensor in device memory,
//! and the mesh logic shared with the reference ([`llm_ir::interp::eval::shard`]: which
//! device holds which piece, which devices meet in a collective and in which order they
//! fold) runs over them through [`GpuMesh`]. Boxes are strided copies (the transpose
//! shader, from a first element), gathers are placements, folds and products shaders of
//! their own; `unshard` checks on the device that the devices agree (a difference is a
//! fault that fails the call when it ends).

use std::rc::Rc;

use llm_ir::{
    interp::eval::{
        shard::{
            MeshOps, all_gather_with, all_reduce_with, product_shape, reduce_scatter_with,
            shard_value, sharded_linear_with, unshard_value,
        },
        strides,
    },
    types::Reduction,
};

use super::{Call, Slot, WG};
use crate::{
    gpu::tensor::{DeviceTensor, Elem},
    kernel::{Contraction, Kernel, MeshMove, WeightFormat},
};

impl Call<'_> {
    /// Runs a step on sharded values (`sharded_linear`, the collectives, `shard`,
    /// `unshard`, `all_gather`); `false` when its values need the reference semantics
    /// (products and folds take f32 shards, moves any 4-byte elements).
    pub(super) fn mesh_step(
        &mut self,
        index: usize,
        step: &super::Step,
        kernel: &Kernel,
        pipelines: &[wgpu::ComputePipeline],
    ) -> Result<bool, String> {
        let f32_only = !matches!(kernel, Kernel::Mesh(_));
        // Boxes (of a shard, of a reduce-scatter's result) of more than four dims may not
        // merge into the strided copy's four.
        let boxes = matches!(
            kernel,
            Kernel::ReduceScatter { .. } | Kernel::Mesh(MeshMove::Shard { .. })
        );
        let usable = |t: &DeviceTensor| {
            t.parts.len() == 1
                && !(boxes && t.shape.len() > 4)
                && if f32_only {
                    t.elem == Elem::F32
                } else {
                    !matches!(t.elem, Elem::Packed(_))
                }
        };
        let mut mesh = GpuMesh::new(index, kernel, pipelines);
        let out = if let Kernel::Mesh(MeshMove::Shard {
            mesh: axes,
            split,
            reduction,
        }) = kernel
        {
            let x = self.device(step.inputs[0])?;
            if !usable(&x) {
                return Ok(false);
            }
            let y = shard_value(&mut mesh.on(self), &x, axes, split, *reduction)?;
            Slot::Sharded(Rc::new(y))
        } else {
            let x = self.sharded(step.inputs[0])?;
            if !x.shards.iter().all(usable) {
                return Ok(false);
            }
            match kernel {
                Kernel::ShardedLinear { reduction, .. } => {
                    let w = self.sharded(step.inputs[1])?;
                    if !w.shards.iter().all(usable) {
                        return Ok(false);
                    }
                    let y = sharded_linear_with(&mut mesh.on(self), &x, &w, *reduction)?;
                    Slot::Sharded(Rc::new(y))
                }
                Kernel::AllReduce { axes, .. } => {
                    Slot::Sharded(Rc::new(all_reduce_with(&mut mesh.on(self), &x, axes)?))
                }
                Kernel::ReduceScatter { axes, dim, .. } => {
                    let y = reduce_scatter_with(&mut mesh.on(self), &x, *dim, axes)?;
                    Slot::Sharded(Rc::new(y))
                }
                Kernel::Mesh(MeshMove::AllGather { axes, dim }) => {
                    let y = all_gather_with(&mut mesh.on(self), &x, *dim, axes)?;
                    Slot::Sharded(Rc::new(y))
                }
                Kernel::Mesh(MeshMove::Unshard) => {
                    Slot::Device(unshard_value(&mut mesh.on(self), &x)?)
                }
                _ => return Ok(false),
            }
        };
        self.env[step.outputs[0]] = Some(out);
        Ok(true)
    }
}

/// The shaders a mesh step runs, by what they do.
struct GpuMesh<'p> {
    /// The step (its outputs are numbered from 0 in the order they are made).
    index: usize,
    /// Each device's product: the local contraction and its shader.
    product: Option<(&'p Contraction, &'p wgpu::ComputePipeline)>,
    /// The fold of the collective's reduction.
    fold: Option<&'p wgpu::ComputePipeline>,
    /// The strided copy that takes boxes.
    copy: Option<&'p wgpu::ComputePipeline>,
    /// The placement that concatenates.
    place: Option<&'p wgpu::ComputePipeline>,
    /// The check that two shards agree.
    agree: Option<&'p wgpu::ComputePipeline>,
    /// Outputs made so far.
    made: usize,
}

impl<'p> GpuMesh<'p> {
    /// The shaders of `kernel`, in the order `wgsl::shaders_for` gives them.
    fn new(index: usize, kernel: &'p Kernel, pipelines: &'p [wgpu::ComputePipeline]) -> Self {
        let mut mesh = GpuMesh {
            index,
            product: None,
            fold: None,
            copy: None,
            place: None,
            agree: None,
            made: 0,
        };
        match kernel {
            Kernel::ShardedLinear { local, .. } => mesh.product = Some((local, &pipelines[0])),
            Kernel::AllReduce { .. } => mesh.fold = pipelines.first(),
            Kernel::ReduceScatter { .. } => {
                mesh.fold = pipelines.first();
                mesh.copy = pipelines.get(1);
            }
            Kernel::Mesh(MeshMove::Shard { .. }) => mesh.copy = pipelines.first(),
            Kernel::Mesh(MeshMove::AllGather { .. }) => mesh.place = pipelines.first(),
            Kernel::Mesh(MeshMove::Unshard) => mesh.agree = pipelines.first(),
            _ => {}
        }
        mesh
    }

    /// The shaders bound to the call they record into.
    fn on<'m, 'c, 'a>(&'m mut self, call: &'c mut Call<'a>) -> Bound<'m, 'p, 'c, 'a> {
        Bound { mesh: self, call }
    }

    /// The next output of the step.
    fn next_output(&mut self) -> (usize, usize) {
        self.made += 1;
        (self.index, self.made - 1)
    }
}

/// A [`GpuMesh`] recording into a call.
struct Bound<'m, 'p, 'c, 'a> {
    mesh: &'m mut GpuMesh<'p>,
    call: &'c mut Call<'a>,
}

impl Bound<'_, '_, '_, '_> {
    fn output(&mut self, bytes: usize) -> wgpu::Buffer {
        let (index, i) = self.mesh.next_output();
        self.call.output(index, i, bytes)
    }
}

impl MeshOps for Bound<'_, '_, '_, '_> {
    type Shard = DeviceTensor;

    fn dims(shard: &DeviceTensor) -> &[usize] {
        &shard.shape
    }

    fn take_box(
        &mut self,
        x: &DeviceTensor,
        start: &[usize],
        size: &[usize],
    ) -> Result<DeviceTensor, String> {
        let copy = self.mesh.copy.ok_or("this step takes no boxes")?;
        let strides = strides(&x.shape);
        let first = start.iter().zip(&strides).map(|(a, b)| a * b).sum();
        let out = self.mesh.next_output();
        self.call
            .strided_copy(copy, x, (size, &strides, first), out)?
            .ok_or_else(|| format!("a box {size:?} of {:?} has more than four dims", x.shape))
    }

    fn concat(&mut self, parts: &[&DeviceTensor], dim: usize) -> Result<DeviceTensor, String> {
        let place = self.mesh.place.ok_or("this step concatenates nothing")?;
        let out = self.mesh.next_output();
        self.call.concatenate(place, parts, dim, out)
    }

    fn combine(
        &mut self,
        a: &DeviceTensor,
        b: &DeviceTensor,
        _: Reduction,
    ) -> Result<DeviceTensor, String> {
        // The fold's shader is the reduction's.
        let fold = self.mesh.fold.ok_or("this step folds nothing")?;
        let len = a.len();
        let y = self.output(len * 4);
        self.call.dispatch(
            fold,
            &[len as u32],
            &[a.whole()?, b.whole()?, &y],
            len.div_ceil(WG),
        )?;
        Ok(DeviceTensor::f32(a.shape.clone(), y))
    }

    /// Folds take f32 shards only (`mesh_step`), so nothing is rounded.
    fn round_like(&mut self, acc: DeviceTensor, _: &DeviceTensor) -> Result<DeviceTensor, String> {
        Ok(acc)
    }

    fn linear(&mut self, x: &DeviceTensor, w: &DeviceTensor) -> Result<DeviceTensor, String> {
        let (c, pipeline) = self.mesh.product.ok_or("this step has no product")?;
        // The local product is a plain f32 contraction (no norm, residual or q8_0 rows).
        let plain = c.norm_eps_bits.is_none() && !c.residual && !c.q8_0_input;
        let f32_weight = matches!(
            c.weight,
            WeightFormat::F32 | WeightFormat::F32Panels | WeightFormat::F32KN
        );
        if !plain || !f32_weight || w.shape != [c.n, c.k] || x.shape.last() != Some(&c.k) {
            return Err(format!(
                "a local input {:?} by a weight {:?} is not the {}x{} product",
                x.shape, w.shape, c.n, c.k
            ));
        }
        let m = x.len() / c.k.max(1);
        let y = self.output(m * c.n * 4);
        self.call.contract_parts(pipeline, (x, w, &y), &[], c.n)?;
        Ok(DeviceTensor::f32(product_shape(&x.shape, c.n), y))
    }

    /// Checked on the device: a difference is the step's fault, which fails the call
    /// when it ends (nothing is read back here).
    fn same(&mut self, a: &DeviceTensor, b: &DeviceTensor) -> Result<bool, String> {
        if a.shape != b.shape || a.elem != b.elem {
            return Ok(false);
        }
        if a.whole()? == b.whole()? {
            return Ok(true);
        }
        let agree = self.mesh.agree.ok_or("this step compares nothing")?;
        let fault = self.call.fault_word();
        let len = a.len();
        self.call.dispatch(
            agree,
            &[len as u32, self.mesh.index as u32],
            &[a.whole()?, b.whole()?, &fault],
            len.div_ceil(WG),
        )?;
        Ok(true)
    }
}
