#pragma once
//! @file
//! The one way locus writes a file: into an unnamed file in the target's folder (`O_TMPFILE`), then
//! fsync, give it a name and rename that over the target, so a failed or interrupted write (a full
//! disk, a file-size limit, a signal, a value rejected half-way) never leaves a truncated file where
//! a good one was. Readers see either the old file or the complete new one. Because the file has no
//! name until it is complete, a process killed while writing (SIGKILL, the OOM killer) leaves
//! nothing behind either. Where the filesystem has no `O_TMPFILE` (some network filesystems), a
//! named temporary `.<name>.locus-tmp.<pid>.<n>` is written instead; only a kill can leave one.
//!
//! Targets that are not regular files (a character device such as /dev/null, a FIFO) cannot be
//! replaced by a rename; they are written directly, which is what a user who names one asks for.
//! So is a path that names one of the process's open descriptors (/dev/stdout, /dev/fd/N): it leads
//! to whatever the descriptor holds, and where that is the file a shell redirected it to, a rename
//! would replace the file under the shell (what it held before, and what the program prints later,
//! would be lost). A directory, a folder that does not exist, or an existing file the caller may not
//! write (which open() would refuse, though the folder allows the rename) is a `locus::io_error`.
//! The new file is a new inode: another hard link to the old one keeps the old content. A target
//! the final rename could not replace (check_replaceable: a name past the folder's limit, an
//! append-only folder, another user's file in a sticky folder, a bind-mounted file) is refused when
//! it is opened, before the caller's work.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <limits.h>
#include <locus/core/error.hpp>
#include <stdlib.h>
#include <string>
#include <string_view>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE {

namespace detail {
//! Set to make atomic_file write a named temporary even where `O_TMPFILE` works: the path taken on
//! filesystems without it, so that it can be tested on any machine.
inline std::atomic<bool> atomic_file_named_temporary{false};
} // namespace detail

namespace detail {
//! The open descriptor a path spelled as one names (/dev/stdout, /dev/stderr, /dev/fd/N,
//! /proc/self/fd/N, /proc/thread-self/fd/N, /proc/<this process>/fd/N), else -1.
inline int descriptor_path_fd(std::string_view path) noexcept {
  const auto open = [](int fd) { return ::fcntl(fd, F_GETFD) == -1 ? -1 : fd; };
  if (path == "/dev/stdout") return open(STDOUT_FILENO);
  if (path == "/dev/stderr") return open(STDERR_FILENO);
  const std::string own = "/proc/" + std::to_string(::getpid()) + "/fd/";
  for (const std::string_view prefix : {std::string_view("/dev/fd/"), std::string_view("/proc/self/fd/"),
                                        std::string_view("/proc/thread-self/fd/"), std::string_view(own)}) {
    if (!path.starts_with(prefix)) continue;
    int fd = -1;
    const auto [end, ec] = std::from_chars(path.data() + prefix.size(), path.data() + path.size(), fd);
    return ec == std::errc{} && end == path.data() + path.size() && fd >= 0 ? open(fd) : -1;
  }
  return -1;
}
} // namespace detail

//! The descriptor `path` names when it names one of this process's open files (/dev/stdout,
//! /dev/stderr, /dev/fd/N, /proc/self/fd/N, ...: detail::descriptor_path_fd), spelled with extra
//! slashes or dots or reached through symbolic links of the caller's own (a link to /dev/stdout),
//! else -1: what atomic_file writes through directly. The links are read one at a time, so that
//! /dev/stdout's own (to /proc/self/fd/1, then to the file a shell redirected it to) stops at the
//! descriptor.
inline int open_stream_fd(std::string_view path) noexcept {
  try {
    std::string p = std::filesystem::path(path).lexically_normal().string();
    for (int hop = 0; hop < 8; ++hop) {
      if (const int fd = detail::descriptor_path_fd(p); fd >= 0) return fd;
      char target[PATH_MAX];
      const ssize_t n = ::readlink(p.c_str(), target, sizeof target - 1);
      if (n <= 0) return -1; // not a link: a path of its own
      std::filesystem::path next(std::string(target, static_cast<std::size_t>(n)));
      if (next.is_relative()) next = std::filesystem::path(p).parent_path() / next;
      p = next.lexically_normal().string();
    }
  } catch (...) { // (an allocation)
  }
  return -1;
}

//! A file being written atomically: `write` as often as needed, then `commit()`. Destroying it
//! without a commit (an exception on the way) removes the temporary file and leaves the target as
//! it was.
class atomic_file {
public:
  //! Opens a temporary file next to `path` (or `path` itself when it is a device or FIFO).
  //! @throws locus::io_error when the folder cannot be written, `path` is a directory, or a
  //!         symbolic link in it loops
  explicit atomic_file(std::string path) : target_(std::move(path)) {
    if (target_.empty()) LOCUS_THROW(io_error, "cannot write a file with an empty name");
    if (const int fd = open_stream_fd(target_); fd >= 0) {
      // Through the descriptor itself: in its mode and at its position (an append stays one), and
      // before what the program prints to it later.
      fd_ = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
      if (fd_ < 0) fail(target_, "cannot write", errno);
      stream_ = fd;
      direct_ = true;
      return;
    }
    resolve_target();
    struct stat st {};
    const bool exists = ::stat(target_.c_str(), &st) == 0;
    if (exists && S_ISDIR(st.st_mode)) fail(target_, "cannot write", EISDIR, "it is a directory");
    // A file the caller may not write is not replaced either: the rename needs only the folder's
    // permission, and would take a read-only file (or another user's) that open() refuses.
    if (exists && S_ISREG(st.st_mode) && ::faccessat(AT_FDCWD, target_.c_str(), W_OK, AT_EACCESS) != 0)
      fail(target_, "cannot write", errno);
    if (exists && !S_ISREG(st.st_mode)) {
      // A device or FIFO: rename would replace the node itself, so write straight into it.
      fd_ = ::open(target_.c_str(), O_WRONLY | O_CLOEXEC);
      if (fd_ < 0) fail(target_, "cannot open for writing", errno);
      direct_ = true;
      return;
    }
    const std::string::size_type slash = target_.rfind('/');
    const std::string dir = slash == std::string::npos ? std::string(".") : target_.substr(0, slash + 1);
    check_replaceable(dir, exists ? &st : nullptr);
    // 0666 minus the umask, as for any new file; an existing target's mode is kept below.
    if (!detail::atomic_file_named_temporary.load()) {
      fd_ = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
      unnamed_ = fd_ >= 0;
    }
    if (fd_ < 0) {
      // No O_TMPFILE here (or a folder that refuses it): a named temporary, whose errors also say
      // why the folder cannot be written.
      temp_ = create_named_temporary(O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, -1);
      if (fd_ < 0) {
        const int e = errno;
        temp_.clear();
        // ENOENT also comes from folders that exist but take no new files (/proc).
        struct stat ds {};
        const bool folder = ::stat(dir.c_str(), &ds) == 0 && S_ISDIR(ds.st_mode);
        fail(target_,
             e == ENOENT && !folder ? "cannot write: its folder does not exist" : "cannot create a file in its folder",
             e);
      }
    }
    if (exists) {
      // The replaced file's owner and group where this process may give them (root; a group it is
      // in), then its mode (a change of owner clears set-id bits).
      if (::fchown(fd_, st.st_uid, st.st_gid) != 0) (void)::fchown(fd_, static_cast<uid_t>(-1), st.st_gid);
      (void)::fchmod(fd_, st.st_mode & 07777);
    }
  }

  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;

  ~atomic_file() { abandon(); }

  //! The path being written (symbolic links resolved).
  const std::string& path() const noexcept { return target_; }

  //! True when the bytes go straight into the target (a device, a FIFO, an open descriptor): they
  //! cannot be taken back, and write_at() cannot reach what was written before.
  bool direct() const noexcept { return direct_; }

  //! Appends `n` bytes. @throws locus::io_error (errno as code(), e.g. ENOSPC or EFBIG)
  void write(const void* data, std::size_t n) {
    if (n == 0) return;
    check_writing();
    const auto* p = static_cast<const char*>(data);
    if (buffer_.size() + n <= buffer_capacity) {
      buffer_.insert(buffer_.end(), p, p + n);
      return;
    }
    flush();
    if (n >= buffer_capacity) {
      write_all(p, n);
      return;
    }
    buffer_.assign(p, p + n);
  }
  void write(std::string_view s) { write(s.data(), s.size()); }

  //! Overwrites `n` bytes at byte offset `offset` of what was written so far (the binary trace
  //! writer fills in its header last). @throws locus::io_error when the target is written directly
  //! (direct(): a FIFO cannot seek, and a descriptor's file may hold more than this writer wrote)
  void write_at(std::uint64_t offset, const void* data, std::size_t n) {
    check_writing();
    if (direct_)
      fail(target_, "cannot write back", ESPIPE, "this output is written straight through (name a regular file)");
    flush();
    const auto* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
      if (w < 0) {
        if (errno == EINTR) continue;
        fail(target_, "write failed", errno);
      }
      p += w;
      n -= static_cast<std::size_t>(w);
      offset += static_cast<std::uint64_t>(w);
    }
  }

  //! Writes out and syncs everything written, so that commit() has only to name and rename the
  //! file: a command with several outputs prepares each, and a full disk or a file-size limit then
  //! fails before any of them replaces its target (an unnamed file keeps no name meanwhile, so a
  //! process killed before commit() leaves nothing behind; the named fallback leaves its
  //! temporary). Nothing may be written after it.
  //! @throws locus::io_error (the target keeps its old content)
  void prepare() {
    if (prepared_) return;
    check_open();
    flush();
    if (::fsync(fd_) != 0 && !(direct_ && (errno == EINVAL || errno == EROFS))) fail(target_, "fsync failed", errno);
    prepared_ = true;
  }

  //! Prepares the file (prepare()) and gives it its temporary name beside the target, so that
  //! commit() has only the rename left: a command with several outputs stages each before it
  //! renames any. Nothing may be written after it.
  //! @throws locus::io_error (the target keeps its old content)
  void stage() {
    if (staged_) return;
    check_open();
    prepare();
    if (unnamed_) {
      // The complete file gets a name beside the target (linkat cannot replace a file), which the
      // rename moves over it: the only moment a temporary name exists.
      temp_ = create_named_temporary(0, fd_);
      if (temp_.empty()) fail(target_, "cannot name the written file in its folder", errno);
    }
    const int fd = fd_;
    fd_ = -1;
    staged_ = true;
    if (::close(fd) != 0 && errno != EINTR) fail(target_, "close failed", errno);
  }

  //! Stages the file (stage()) and renames it over the target.
  //! @throws locus::io_error when any step fails (the target then keeps its old content)
  void commit() {
    if (committed_) LOCUS_THROW(io_error, target_, ": committed twice");
    stage();
    committed_ = true;
    if (direct_) return;
    if (::rename(temp_.c_str(), target_.c_str()) != 0) fail(target_, "cannot replace the file", errno);
    temp_.clear();
    // Make the rename itself durable; a folder that refuses fsync is no reason to fail the write.
    const std::string::size_type slash = target_.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : target_.substr(0, slash));
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }

private:
  static constexpr std::size_t buffer_capacity = std::size_t{1} << 20;

  //! `why` words the cause when the system's words for `e` would only repeat it.
  [[noreturn]] void fail(const std::string& what_path, const char* what, int e, const char* why = nullptr) {
    abandon();
    throw io_error(detail::concat(what_path, ": ", what, ": ", why ? why : std::strerror(e)), __FILE__, __LINE__, e);
  }

  //! The longest file name the folder `dir` takes.
  static std::size_t name_max(const std::string& dir) {
    const long n = ::pathconf(dir.c_str(), _PC_NAME_MAX);
    return n > 0 ? static_cast<std::size_t>(n) : std::size_t{NAME_MAX};
  }

  //! Refuses, before anything is written, a target the final rename would fail to replace: a name
  //! longer than the folder takes, a folder with the append-only attribute (chattr +a: no entry in
  //! it may be renamed or removed), a file of another user in a sticky folder (/tmp), a file that
  //! is a mount point of its own (a container's bind-mounted file). `existing` is the target's
  //! stat, or null when there is none.
  void check_replaceable(const std::string& dir, const struct stat* existing) {
    const std::string::size_type slash = target_.rfind('/');
    const std::size_t base = slash == std::string::npos ? target_.size() : target_.size() - slash - 1;
    if (base > name_max(dir)) fail(target_, "cannot write", ENAMETOOLONG);
#if defined(STATX_ATTR_APPEND)
    struct statx dx {};
    if (::statx(AT_FDCWD, dir.c_str(), 0, STATX_BASIC_STATS, &dx) == 0 &&
        (dx.stx_attributes_mask & STATX_ATTR_APPEND) && (dx.stx_attributes & STATX_ATTR_APPEND))
      fail(target_, "cannot write", EPERM,
           "its folder is append-only (chattr +a), and a file is put in place by a rename, which it refuses");
#endif
    if (!existing) return;
    struct stat ds {};
    const uid_t me = ::geteuid();
    if (::stat(dir.c_str(), &ds) == 0 && (ds.st_mode & S_ISVTX) && me != 0 && existing->st_uid != me && ds.st_uid != me)
      fail(target_, "cannot replace the file", EPERM,
           "it is another user's, in a folder that lets only its owner replace it (the sticky bit, as /tmp has)");
#if defined(STATX_ATTR_MOUNT_ROOT)
    struct statx sx {};
    if (::statx(AT_FDCWD, target_.c_str(), 0, STATX_BASIC_STATS, &sx) == 0 &&
        (sx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) && (sx.stx_attributes & STATX_ATTR_MOUNT_ROOT))
      fail(target_, "cannot replace the file", EBUSY,
           "it is mounted on its own (a bind-mounted file), and a rename cannot replace a mount point; mount its "
           "folder instead");
#endif
  }

  //! A fresh `.<name>.locus-tmp.<pid>.<n>` beside the target (the name cut short where the whole
  //! would pass the folder's name limit): created with `open(flags)` into fd_ when `linked_fd` is
  //! -1, else linked to the unnamed file `linked_fd`. Empty when none could be made (errno says
  //! why).
  std::string create_named_temporary(int flags, int linked_fd) {
    const std::string::size_type slash = target_.rfind('/');
    const std::string dir = slash == std::string::npos ? std::string() : target_.substr(0, slash + 1);
    const std::string base = slash == std::string::npos ? target_ : target_.substr(slash + 1);
    const std::size_t limit = name_max(dir.empty() ? std::string(".") : dir);
    static std::atomic<unsigned long> counter{0};
    for (int attempt = 0; attempt < 100; ++attempt) {
      const std::string suffix =
          ".locus-tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
      const std::size_t room = limit > suffix.size() + 1 ? limit - suffix.size() - 1 : 0;
      std::string name = dir + "." + base.substr(0, room) + suffix;
      if (linked_fd < 0) {
        fd_ = ::open(name.c_str(), flags, 0666);
        if (fd_ >= 0) return name;
      } else {
        // Through /proc (any user may link its own open file there); AT_EMPTY_PATH where /proc is
        // not mounted (that one needs CAP_DAC_READ_SEARCH).
        const std::string proc = "/proc/self/fd/" + std::to_string(linked_fd);
        if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, name.c_str(), AT_SYMLINK_FOLLOW) == 0) return name;
        if (errno == ENOENT && ::linkat(linked_fd, "", AT_FDCWD, name.c_str(), AT_EMPTY_PATH) == 0) return name;
      }
      if (errno != EEXIST) break;
    }
    return {};
  }

  void check_open() const {
    if (fd_ < 0) LOCUS_THROW(io_error, target_, ": used after the file was committed or abandoned");
  }
  void check_writing() const {
    check_open();
    if (prepared_) LOCUS_THROW(io_error, target_, ": written after the file was prepared");
  }

  void abandon() noexcept {
    if (fd_ >= 0) {
      ::close(fd_);
      fd_ = -1;
    }
    if (!temp_.empty()) {
      ::unlink(temp_.c_str());
      temp_.clear();
    }
    buffer_.clear();
  }

  //! A symbolic link is followed so that the file it names is replaced, not the link.
  void resolve_target() {
    struct stat lst {};
    if (::lstat(target_.c_str(), &lst) != 0 || !S_ISLNK(lst.st_mode)) return;
    char* real = ::realpath(target_.c_str(), nullptr);
    if (real) {
      target_ = real;
      ::free(real);
      return;
    }
    const int e = errno;
    if (e == ELOOP) fail(target_, "cannot write: symbolic links loop", e);
    // A dangling link: create the file it points to, next to the link when the target is relative.
    std::vector<char> buf(PATH_MAX + 1);
    const ssize_t n = ::readlink(target_.c_str(), buf.data(), PATH_MAX);
    if (n <= 0) fail(target_, "cannot read the symbolic link", errno);
    std::string link(buf.data(), static_cast<std::size_t>(n));
    const std::string::size_type slash = target_.rfind('/');
    if (link.front() != '/' && slash != std::string::npos) link = target_.substr(0, slash + 1) + link;
    target_ = std::move(link);
  }

  void flush() {
    if (buffer_.empty()) return;
    write_all(buffer_.data(), buffer_.size());
    buffer_.clear();
  }

  void write_all(const char* p, std::size_t n) {
    if (stream_ >= 0) { // what the program printed before comes first (the descriptor may be a copy of stdout)
      std::fflush(stdout);
      std::fflush(stderr);
    }
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, std::min<std::size_t>(n, std::size_t{1} << 30));
      if (w < 0) {
        if (errno == EINTR) continue;
        fail(target_, "write failed", errno);
      }
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }

  std::string target_;
  std::string temp_;
  int fd_ = -1;
  bool direct_ = false;
  int stream_ = -1;        // the process's descriptor the target names (open_stream_fd), or -1
  bool unnamed_ = false;   // written through O_TMPFILE: no name until stage()
  bool prepared_ = false;  // prepare() done: written out and synced, nothing more to write
  bool staged_ = false;    // stage() done: closed, named beside the target; the rename is left
  bool committed_ = false; // commit() called
  std::vector<char> buffer_;
};

//! Throws what writing `path` would throw on opening (a folder that does not exist or takes no
//! files, a directory in the way), without writing anything: for a program that checks its
//! outputs before hours of work. An existing device or FIFO is not opened (a FIFO would wait for
//! a reader). @throws locus::io_error
inline void check_writable(const std::string& path) {
  struct stat st {};
  if (!path.empty() && ::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) return;
  atomic_file probe(path); // never committed: its unnamed (or temporary) file goes away
}

//! Writes `content` to `path` atomically (see atomic_file). @throws locus::io_error
inline void write_file_atomically(const std::string& path, std::string_view content) {
  atomic_file f(path);
  f.write(content);
  f.commit();
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE
