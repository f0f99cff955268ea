// Command ipcapp is the IPC test app: a process tree whose state lives in the kernel objects a
// checkpoint must carry. The parent runs one event loop on epoll, driven by a timerfd; each round
// it
//   - sends the round number over a pipe to a child it started (exec'd: `ipcapp -child`), which
//     answers its square over another pipe and writes the number into a memfd both map shared;
//   - writes 1 to an eventfd (read back by the loop) and sends itself SIGUSR1, read from a
//     signalfd;
//   - publishes the round in an anonymous shared mapping (MAP_SHARED|MAP_ANONYMOUS) that a forked
//     child (fork without exec, as PostgreSQL's backends) reads: it counts, and echoes 3×round.
//
// After each round it appends one line to STATE (opened for each line: no file held open):
//
//	token=T round=R replies=P events=E signals=S memfd=M forked=F echo=X
//
// and a line "ERROR …" whenever an answer is wrong. A restored tree keeps T and continues R.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

var (
	statePath string
	sysv      bool
	sysvMem   *uint64
)

func main() {
	child := flag.Bool("child", false, "run as the pipe child")
	flag.BoolVar(&sysv, "sysv", false, "also count in a SysV shared memory segment (sysv=N)")
	flag.StringVar(&statePath, "state", "", "state file")
	flag.Parse()
	if *child {
		pipeChild()
		return
	}
	if err := run(); err != nil {
		record("ERROR %v", err)
		os.Exit(1)
	}
}

func record(format string, args ...any) {
	f, err := os.OpenFile(statePath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		os.Exit(3)
	}
	fmt.Fprintf(f, format+"\n", args...)
	f.Close()
}

// pipeChild answers each number n read on stdin with n*n on stdout, and stores n in the memfd
// (fd 3) it shares with its parent.
func pipeChild() {
	mem, err := unix.Mmap(3, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		os.Exit(4)
	}
	shared := (*uint64)(unsafe.Pointer(&mem[0]))
	var buf []byte
	in := make([]byte, 512)
	for {
		n, err := os.Stdin.Read(in)
		if err != nil {
			os.Exit(0) // the parent went away
		}
		buf = append(buf, in[:n]...)
		for {
			i := bytes.IndexByte(buf, '\n')
			if i < 0 {
				break
			}
			v, _ := strconv.ParseUint(string(buf[:i]), 10, 64)
			buf = buf[i+1:]
			atomic.StoreUint64(shared, v)
			fmt.Fprintf(os.Stdout, "%d\n", v*v)
		}
	}
}

// shm is the anonymous shared page: [0] the parent's round, [1] the forked child's counter,
// [2] its echo (3 × the round it saw).
var (
	shm   *[3]uint64
	nap   = syscall.Timespec{Nsec: 5_000_000}
	noSig = ^uint64(0)
)

// forkedLoop is all the forked child ever runs: it has only the thread that forked, so it must
// never enter the Go runtime again (no allocation, no stack growth, no scheduler): atomics and raw
// system calls only.
//
//go:nosplit
func forkedLoop() {
	syscall.RawSyscall6(syscall.SYS_RT_SIGPROCMASK, unix.SIG_SETMASK, uintptr(unsafe.Pointer(&noSig)), 0, 8, 0, 0)
	syscall.RawSyscall(syscall.SYS_PRCTL, unix.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0)
	for {
		atomic.AddUint64(&shm[1], 1)
		atomic.StoreUint64(&shm[2], 3*atomic.LoadUint64(&shm[0]))
		syscall.RawSyscall(syscall.SYS_NANOSLEEP, uintptr(unsafe.Pointer(&nap)), 0, 0)
	}
}

func forkChild() error {
	mem, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap shared anonymous: %w", err)
	}
	shm = (*[3]uint64)(unsafe.Pointer(&mem[0]))
	pid, _, errno := syscall.RawSyscall(syscall.SYS_FORK, 0, 0, 0)
	if errno != 0 {
		return fmt.Errorf("fork: %w", errno)
	}
	if pid == 0 {
		forkedLoop()
	}
	return nil
}

type app struct {
	token                            string
	round, replies, events, signals  uint64
	reqW, repR, tfd, efd, sfd, memfd int
	memfdMap                         *uint64
	pending                          []byte
}

func run() error {
	runtime.LockOSThread() // the signalfd's signal is blocked on this thread only
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	a := &app{token: hex.EncodeToString(b)}
	if err := forkChild(); err != nil {
		return err
	}
	if sysv {
		id, err := unix.SysvShmGet(unix.IPC_PRIVATE, 4096, unix.IPC_CREAT|0o600)
		if err != nil {
			return fmt.Errorf("shmget: %w", err)
		}
		mem, err := unix.SysvShmAttach(id, 0, 0)
		if err != nil {
			return fmt.Errorf("shmat: %w", err)
		}
		sysvMem = (*uint64)(unsafe.Pointer(&mem[0]))
	}
	if err := a.startPipeChild(); err != nil {
		return err
	}
	if err := a.openFds(); err != nil {
		return err
	}
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	for _, fd := range []int{a.tfd, a.efd, a.sfd, a.repR} {
		if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}); err != nil {
			return fmt.Errorf("epoll add %d: %w", fd, err)
		}
	}
	events := make([]unix.EpollEvent, 8)
	for {
		n, err := unix.EpollWait(ep, events, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("epoll_wait: %w", err)
		}
		for _, ev := range events[:n] {
			if err := a.handle(int(ev.Fd)); err != nil {
				return err
			}
		}
	}
}

func (a *app) startPipeChild() error {
	var req, rep [2]int
	if err := unix.Pipe2(req[:], unix.O_CLOEXEC); err != nil {
		return err
	}
	if err := unix.Pipe2(rep[:], unix.O_CLOEXEC); err != nil {
		return err
	}
	memfd, err := unix.MemfdCreate("ipcapp-shared", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(memfd, 4096); err != nil {
		return err
	}
	mem, err := unix.Mmap(memfd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap memfd: %w", err)
	}
	a.memfdMap = (*uint64)(unsafe.Pointer(&mem[0]))
	self, err := os.Executable()
	if err != nil {
		return err
	}
	in, out, shared := os.NewFile(uintptr(req[0]), "req"), os.NewFile(uintptr(rep[1]), "rep"), os.NewFile(uintptr(memfd), "memfd")
	cmd := exec.Command(self, "-child")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = in, out, os.Stderr
	cmd.ExtraFiles = []*os.File{shared}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the pipe child: %w", err)
	}
	in.Close()
	out.Close()
	a.reqW, a.repR, a.memfd = req[1], rep[0], memfd
	return nil
}

func (a *app) openFds() error {
	var err error
	if a.tfd, err = unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_CLOEXEC); err != nil {
		return fmt.Errorf("timerfd: %w", err)
	}
	every := unix.NsecToTimespec(20_000_000)
	if err := unix.TimerfdSettime(a.tfd, 0, &unix.ItimerSpec{Interval: every, Value: every}, nil); err != nil {
		return err
	}
	if a.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	var set unix.Sigset_t
	set.Val[0] = 1 << (uint(syscall.SIGUSR1) - 1)
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &set, nil); err != nil {
		return err
	}
	if a.sfd, err = unix.Signalfd(-1, &set, unix.SFD_CLOEXEC); err != nil {
		return fmt.Errorf("signalfd: %w", err)
	}
	return nil
}

func (a *app) handle(fd int) error {
	buf := make([]byte, 512)
	switch fd {
	case a.tfd:
		if _, err := unix.Read(a.tfd, buf[:8]); err != nil {
			return fmt.Errorf("timerfd read: %w", err)
		}
		a.round++
		atomic.StoreUint64(&shm[0], a.round)
		if _, err := unix.Write(a.reqW, []byte(strconv.FormatUint(a.round, 10)+"\n")); err != nil {
			return fmt.Errorf("pipe write: %w", err)
		}
		if _, err := unix.Write(a.efd, []byte{1, 0, 0, 0, 0, 0, 0, 0}); err != nil {
			return fmt.Errorf("eventfd write: %w", err)
		}
		if err := unix.Tgkill(unix.Getpid(), unix.Gettid(), syscall.SIGUSR1); err != nil {
			return err
		}
		extra := ""
		if sysvMem != nil {
			extra = fmt.Sprintf(" sysv=%d", atomic.AddUint64(sysvMem, 1))
		}
		record("token=%s round=%d replies=%d events=%d signals=%d memfd=%d forked=%d echo=%d%s", a.token, a.round, a.replies,
			a.events, a.signals, atomic.LoadUint64(a.memfdMap), atomic.LoadUint64(&shm[1]), atomic.LoadUint64(&shm[2]), extra)
	case a.efd:
		if _, err := unix.Read(a.efd, buf[:8]); err != nil {
			return fmt.Errorf("eventfd read: %w", err)
		}
		a.events += *(*uint64)(unsafe.Pointer(&buf[0]))
	case a.sfd:
		n, err := unix.Read(a.sfd, buf[:128])
		if err != nil {
			return fmt.Errorf("signalfd read: %w", err)
		}
		if signo := *(*uint32)(unsafe.Pointer(&buf[0])); n != 128 || signo != uint32(syscall.SIGUSR1) {
			record("ERROR signalfd: %d bytes, signal %d", n, signo)
		}
		a.signals++
	case a.repR:
		return a.readReplies(buf)
	}
	return nil
}

// readReplies checks each answer of the pipe child: the square of the next number sent.
func (a *app) readReplies(buf []byte) error {
	n, err := unix.Read(a.repR, buf)
	if err != nil || n == 0 {
		return fmt.Errorf("pipe read: %d bytes, %v", n, err)
	}
	a.pending = append(a.pending, buf[:n]...)
	for {
		i := bytes.IndexByte(a.pending, '\n')
		if i < 0 {
			return nil
		}
		v, _ := strconv.ParseUint(string(a.pending[:i]), 10, 64)
		a.pending = a.pending[i+1:]
		a.replies++
		if v != a.replies*a.replies {
			record("ERROR reply %d to request %d", v, a.replies)
		}
	}
}
