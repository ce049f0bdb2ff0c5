#include "textflag.h"

// func cpuHasAVX2() bool
TEXT ·cpuHasAVX2(SB), NOSPLIT, $0-1
	// CPUID.1:ECX: OSXSAVE (bit 27) and AVX (bit 28).
	MOVL	$1, AX
	XORL	CX, CX
	CPUID
	MOVL	CX, R8
	ANDL	$0x18000000, R8
	CMPL	R8, $0x18000000
	JNE	no
	// XCR0: the OS saves XMM (bit 1) and YMM (bit 2) state.
	XORL	CX, CX
	XGETBV
	ANDL	$6, AX
	CMPL	AX, $6
	JNE	no
	// CPUID.(7,0):EBX: AVX2 (bit 5).
	MOVL	$7, AX
	XORL	CX, CX
	CPUID
	ANDL	$0x20, BX
	JZ	no
	MOVB	$1, ret+0(FP)
	RET
no:
	MOVB	$0, ret+0(FP)
	RET

// func addScaledF32AVX2(acc *float64, src *byte, n int, w float64)
TEXT ·addScaledF32AVX2(SB), NOSPLIT, $0-32
	MOVQ	acc+0(FP), DI
	MOVQ	src+8(FP), SI
	MOVQ	n+16(FP), CX
	VBROADCASTSD	w+24(FP), Y0

loop16:
	CMPQ	CX, $16
	JLT	loop4
	VCVTPS2PD	(SI), Y1
	VCVTPS2PD	16(SI), Y2
	VCVTPS2PD	32(SI), Y3
	VCVTPS2PD	48(SI), Y4
	VMULPD	Y0, Y1, Y1
	VMULPD	Y0, Y2, Y2
	VMULPD	Y0, Y3, Y3
	VMULPD	Y0, Y4, Y4
	VADDPD	(DI), Y1, Y1
	VADDPD	32(DI), Y2, Y2
	VADDPD	64(DI), Y3, Y3
	VADDPD	96(DI), Y4, Y4
	VMOVUPD	Y1, (DI)
	VMOVUPD	Y2, 32(DI)
	VMOVUPD	Y3, 64(DI)
	VMOVUPD	Y4, 96(DI)
	ADDQ	$64, SI
	ADDQ	$128, DI
	SUBQ	$16, CX
	JMP	loop16

loop4:
	CMPQ	CX, $4
	JLT	tail
	VCVTPS2PD	(SI), Y1
	VMULPD	Y0, Y1, Y1
	VADDPD	(DI), Y1, Y1
	VMOVUPD	Y1, (DI)
	ADDQ	$16, SI
	ADDQ	$32, DI
	SUBQ	$4, CX
	JMP	loop4

tail:
	TESTQ	CX, CX
	JEQ	done
	VCVTSS2SD	(SI), X1, X1
	VMULSD	X0, X1, X1
	VADDSD	(DI), X1, X1
	VMOVSD	X1, (DI)
	ADDQ	$4, SI
	ADDQ	$8, DI
	DECQ	CX
	JMP	tail

done:
	VZEROUPPER
	RET

// func scaleToF32AVX2(dst *byte, acc *float64, n int, r float64) bool
TEXT ·scaleToF32AVX2(SB), NOSPLIT, $0-33
	MOVQ	dst+0(FP), DI
	MOVQ	acc+8(FP), SI
	MOVQ	n+16(FP), CX
	VBROADCASTSD	r+24(FP), Y0
	VXORPS	X7, X7, X7

loop8:
	CMPQ	CX, $8
	JLT	loop1
	VMULPD	(SI), Y0, Y1
	VMULPD	32(SI), Y0, Y2
	VCVTPD2PSY	Y1, X1
	VCVTPD2PSY	Y2, X2
	VMOVUPS	X1, (DI)
	VMOVUPS	X2, 16(DI)
	// x - x is +0 for finite x and NaN otherwise; OR them all together.
	VSUBPS	X1, X1, X3
	VSUBPS	X2, X2, X4
	VORPS	X3, X7, X7
	VORPS	X4, X7, X7
	ADDQ	$64, SI
	ADDQ	$32, DI
	SUBQ	$8, CX
	JMP	loop8

loop1:
	TESTQ	CX, CX
	JEQ	done
	VMULSD	(SI), X0, X1
	VCVTSD2SS	X1, X1, X1
	VMOVSS	X1, (DI)
	// Reload it alone: VMOVSS from memory clears the upper lanes.
	VMOVSS	(DI), X4
	VSUBPS	X4, X4, X3
	VORPS	X3, X7, X7
	ADDQ	$8, SI
	ADDQ	$4, DI
	DECQ	CX
	JMP	loop1

done:
	VPTEST	X7, X7
	SETEQ	ret+32(FP)
	VZEROUPPER
	RET
