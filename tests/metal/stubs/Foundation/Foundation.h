// tests/metal/stubs/Foundation/Foundation.h -- the few Foundation
// declarations ds4_metal.m uses, so that `clang -fsyntax-only` can check it
// on Linux (tests/metal/syntax.sh). Signatures follow Apple's documentation;
// nothing here is ever linked or run.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

typedef signed char BOOL;
#define YES ((BOOL)1)
#define NO ((BOOL)0)
typedef unsigned long NSUInteger;
typedef long NSInteger;
#define nil ((id)0)

@class NSString;

@protocol NSObject
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject>
+ (instancetype)alloc;
- (instancetype)init;
@end

@interface NSError : NSObject
@property (readonly, copy) NSString *localizedDescription;
@end

typedef NSUInteger NSStringEncoding;
enum { NSUTF8StringEncoding = 4 };

@interface NSString : NSObject
+ (instancetype)stringWithUTF8String:(const char *)s;
+ (instancetype)stringWithContentsOfFile:(NSString *)path encoding:(NSStringEncoding)enc
                                   error:(NSError **)error;
@property (readonly) const char *UTF8String;
@end

@interface NSMutableArray<ObjectType> : NSObject
+ (instancetype)array;
- (void)addObject:(ObjectType)o;
@property (readonly) NSUInteger count;
- (ObjectType)objectAtIndexedSubscript:(NSUInteger)i;
@end

#define NS_AUTORELEASEPOOL
